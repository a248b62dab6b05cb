"""Create Label Studio tasks for the images under a GCS prefix, with per-image metadata.

    python -m sdk_scripts.import_gcs --project "Nuclei" --source gs://raw/images --manifest gs://raw/manifest.csv

Each task is ``{"image": "gs://bucket/key", ...metadata}``. Metadata comes from

- a manifest (``--manifest``, a local path or gs:// URI): CSV with a header row, JSON lines, or a JSON
  list/object. Rows are keyed by object name in the key column (``--key-field``; by default the
  first of image, object, object_name, name, key, path, file, filename, uri present). A key may be
  the object name (``images/a.png``), the name relative to the source prefix (``a.png``) or a full
  ``gs://bucket/images/a.png`` URI. Empty CSV cells are left out;
- per-image JSON sidecars next to the image: ``a.png.json`` or ``a.json`` (a JSON object).

Where both exist, the manifest's values win. Metadata must be JSON Label Studio can store: no NaN or
Infinity, nested at most MAX_METADATA_DEPTH deep, no text value over MAX_VALUE_CHARS characters. An
image whose manifest row or sidecar breaks a rule (or cannot be read) is held back: reported as
failed, not imported, so that a rerun with the metadata fixed imports it with its metadata (reruns
skip imported images, so a task created without its metadata would never get it). When the manifest
has rows that cannot even be keyed, every image without metadata is held back the same way. The rest
is imported; the exit status is 1 when anything was held back. The key column and the task's image field are never
taken from metadata. Re-running imports only images not yet in the project (compared by the
task's ``image`` value, whoever created the task, a storage sync included). Images without metadata
and metadata without images are reported at the end (``--require-metadata`` fails before importing
anything when an image has none). ``--dry-run`` shows what would be imported and changes nothing.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from sdk_scripts.common import (
    CliSettings,
    LabelStudioConnection,
    UserError,
    add_gcs_arguments,
    add_label_studio_arguments,
    batched,
    configured_settings,
    connect_label_studio,
    find_project,
    gcs_client,
    gs_uri,
    is_image_name,
    iter_tasks,
    list_objects,
    original_uri,
    parse_gs_uri,
    read_object,
    require_bucket,
    reserved_key_warnings,
    run_main,
)

KEY_FIELDS = ("image", "object", "object_name", "name", "key", "path", "file", "filename", "uri")
SHOWN = 10  # names listed per problem in the report
MAX_VALUE_CHARS = 128 * 1024  # one metadata text value (a CSV cell); csv's own default field limit
MAX_METADATA_DEPTH = 32  # nesting of one image's metadata (its top-level object is depth 1)


@dataclass(frozen=True)
class Manifest:
    """Metadata rows keyed by the manifest's own key text (not yet matched to object names)."""

    rows: dict[str, dict]
    key_field: str
    warnings: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)  # key -> why its row cannot be used
    lost: tuple[str, ...] = ()  # rows that could not be read far enough to know their key


@dataclass(frozen=True)
class ImportPlan:
    """What an import would do. `tasks` are the new tasks, in image-name order."""

    images: tuple[str, ...]
    tasks: tuple[dict, ...]
    already_imported: tuple[str, ...]
    without_metadata: tuple[str, ...]
    metadata_without_image: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()  # "name: why" per image held back (not imported)


# --------------------------------------------------------------------- manifests (pure)
def manifest_format(name: str) -> str:
    """ "csv", "jsonl" or "json" from a file name's extension."""
    lowered = name.lower()
    if lowered.endswith((".csv", ".tsv")):
        return "csv"
    if lowered.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lowered.endswith(".json"):
        return "json"
    raise UserError(f"manifest {name}: unknown format (use .csv, .jsonl/.ndjson or .json)")


def parse_manifest(text: str, fmt: str, key_field: str | None = None, name: str = "manifest") -> Manifest:
    """Rows of a CSV / JSON-lines / JSON manifest, keyed by their key field's value.

    A JSON file may be a list of objects (like JSON lines) or one object mapping keys to metadata.
    Duplicate keys: the last row wins, with a warning. A row that cannot be used (a cell over
    MAX_VALUE_CHARS, NaN, too deep, not an object, not JSON) goes to `failed` under its key, or to
    `lost` when its key cannot be read; the other rows are kept. Raises UserError when the
    manifest as a whole cannot be read.
    """
    if fmt == "csv":
        records = _csv_records(text, name)
    elif fmt == "jsonl":
        records = [
            (f"{name} line {number}", *_json_record(line))
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    elif fmt == "json":
        records = _json_document_records(text, name, key_field or "image")
    else:
        raise UserError(f"unknown manifest format {fmt!r}")
    readable = [record for _, record, _ in records if record is not None]
    if not readable:
        return Manifest(
            rows={}, key_field=key_field or "", lost=tuple(f"{where}: {problem}" for where, _, problem in records)
        )
    chosen = key_field or _guess_key_field(readable[0].keys(), name)
    rows: dict[str, dict] = {}
    failed: dict[str, str] = {}
    warnings: list[str] = []
    lost: list[str] = []
    for number, (where, record, problem) in enumerate(records, start=1):
        if record is None:  # unreadable: `problem` says why
            lost.append(f"{where}: {problem}")
            continue
        key = record.get(chosen)
        if problem is None:
            problem = metadata_problem(record)
        if key is None or not isinstance(key, (str, int)) or str(key).strip() == "":
            if problem is None:
                warnings.append(f"{name} row {number} has no {chosen!r}: skipped")
            else:
                lost.append(f"{where}: {problem}")
            continue
        key = str(key).strip()
        if key in rows or key in failed:
            warnings.append(f"{name} lists {key} twice: the last row wins")
        rows.pop(key, None)
        failed.pop(key, None)
        if problem is None:
            rows[key] = {k: v for k, v in record.items() if k != chosen}
        else:
            failed[key] = f"{where}: {problem}"
    return Manifest(rows=rows, key_field=chosen, warnings=tuple(warnings), failed=failed, lost=tuple(lost))


# (where, the row as an object or None when unreadable, why it cannot be used or None)
Record = tuple[str, "dict | None", "str | None"]


def _csv_records(text: str, name: str) -> list[Record]:
    """CSV rows as records; empty cells left out. A cell over MAX_VALUE_CHARS fails its row (whose
    key is still read); a row the csv module cannot parse is kept as unreadable."""
    text = text.lstrip("\ufeff")  # spreadsheets write a byte-order mark
    dialect = "excel-tab" if "\t" in text.split("\n", 1)[0] and "," not in text.split("\n", 1)[0] else "excel"
    # csv refuses cells over its process-wide limit (128 KiB) with an exception that loses the row:
    # read every cell, then judge sizes per row.
    previous_limit = csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    try:
        reader = csv.DictReader(io.StringIO(text), dialect=dialect)
        if not reader.fieldnames:
            return []
        records: list[Record] = []
        while True:
            line = reader.line_num
            where = f"{name} line {line + 1}"
            try:
                row = next(reader)
            except StopIteration:
                return records
            except csv.Error as error:
                if reader.line_num == line:  # nothing consumed: the reader cannot move on
                    raise UserError(f"{where} is not readable as CSV ({error})") from None
                records.append((where, None, f"not readable as CSV ({error})"))
                continue
            if None in row:
                raise UserError(f"{name} line {reader.line_num} has more cells than the header")
            records.append(
                (where, {k.strip(): v.strip() for k, v in row.items() if k and v is not None and v.strip() != ""}, None)
            )
    finally:
        csv.field_size_limit(previous_limit)


def _json_record(text: str) -> tuple[dict | None, str | None]:
    """One JSON line as (object, None), or (None, why it cannot be read)."""
    try:
        value = json.loads(text)  # NaN and Infinity parse, as floats: metadata_problem names their row
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error})"
    except RecursionError:
        return None, f"nested too deeply to read (at most {MAX_METADATA_DEPTH} levels)"
    if not isinstance(value, dict):
        return None, f"must be a JSON object, got {type(value).__name__}"
    return value, None


def _json_document_records(text: str, name: str, key_name: str) -> list[Record]:
    """A JSON manifest: a list of objects, or one object of objects keyed by `key_name`."""
    try:
        document = json.loads(text)  # NaN and Infinity parse, as floats: metadata_problem names their row
    except ValueError as error:
        raise UserError(f"{name} is not valid JSON: {error}") from None
    except RecursionError:
        raise UserError(
            f"{name} is nested too deeply to read (use at most {MAX_METADATA_DEPTH} levels); nothing imported"
        ) from None
    if isinstance(document, dict):
        return [
            (f"{name} entry {key!r}", {key_name: key, **value}, None)
            if isinstance(value, dict)
            else (f"{name} entry {key!r}", {key_name: key}, f"must be a JSON object, got {type(value).__name__}")
            for key, value in document.items()
        ]
    if isinstance(document, list):
        return [
            (f"{name} item {i}", item, None)
            if isinstance(item, dict)
            else (f"{name} item {i}", None, f"must be a JSON object, got {type(item).__name__}")
            for i, item in enumerate(document)
        ]
    raise UserError(f"{name} must hold a JSON list of objects or an object of objects")


def _json_object(text_or_value, where: str) -> dict:
    value = text_or_value
    if isinstance(text_or_value, str):
        try:
            value = json.loads(text_or_value)
        except json.JSONDecodeError as error:
            raise UserError(f"{where} is not valid JSON: {error}") from None
        except RecursionError:
            raise UserError(f"{where} is nested too deeply to read (at most {MAX_METADATA_DEPTH} levels)") from None
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def metadata_problem(metadata: Mapping) -> str | None:
    """Why Label Studio cannot be sent this metadata, or None: NaN/Infinity (not JSON), nesting
    deeper than MAX_METADATA_DEPTH, a text value over MAX_VALUE_CHARS characters."""
    pending: list[tuple[object, int, str]] = [(metadata, 1, "")]
    while pending:  # iterative: the value may be nested as deep as the JSON parser allows
        value, depth, path = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return f"value {path or '(top)'} is {value}, which JSON cannot carry to Label Studio"
        if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
            return f"value {path or '(top)'} is {len(value)} characters, over the {MAX_VALUE_CHARS} allowed"
        if isinstance(value, (dict, list)):
            if depth > MAX_METADATA_DEPTH:
                return f"value {path} is nested more than {MAX_METADATA_DEPTH} levels deep"
            items = value.items() if isinstance(value, dict) else enumerate(value)
            pending.extend((item, depth + 1, f"{path}.{key}" if path else str(key)) for key, item in items)
    return None


def _guess_key_field(columns: Iterable[str], name: str) -> str:
    present = list(columns)
    lowered = {column.lower(): column for column in present}
    for candidate in KEY_FIELDS:
        if candidate in lowered:
            return lowered[candidate]
    raise UserError(
        f"{name} has no key column (one of {', '.join(KEY_FIELDS)}); columns: {', '.join(present)}. "
        "Name it with --key-field"
    )


def resolve_key(key: str, bucket: str, prefix: str, object_names: set[str]) -> str | None:
    """The object name a manifest key means, or None: a gs:// URI of `bucket`, an object name, or a
    name relative to `prefix`."""
    key = key.strip()
    if key.startswith("gs://"):
        key_bucket, _, name = key[len("gs://") :].partition("/")
        return name if key_bucket == bucket and name in object_names else None
    key = key.lstrip("/")
    if key in object_names:
        return key
    relative = posixpath.join(prefix, key) if prefix else key
    return relative if relative in object_names else None


# --------------------------------------------------------------------- sidecars (pure)
def pair_sidecars(object_names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Sidecar JSON objects for the images among `object_names`: ({image: sidecar}, orphan sidecars).

    ``dir/a.png.json`` belongs to ``dir/a.png``; ``dir/a.json`` to every image ``dir/a.<ext>``
    (``a.png.json`` wins over ``a.json``). JSON objects that belong to no image are orphans.
    """
    names = set(object_names)
    images = sorted(name for name in names if is_image_name(name))
    by_stem: dict[str, list[str]] = {}
    for image in images:
        by_stem.setdefault(posixpath.splitext(image)[0], []).append(image)
    sidecars: dict[str, str] = {}
    used: set[str] = set()
    for image in images:
        exact = image + ".json"
        short = posixpath.splitext(image)[0] + ".json"
        for candidate in (exact, short):
            if candidate in names:
                sidecars[image] = candidate
                used.add(candidate)
                break
    orphans = sorted(name for name in names if name.lower().endswith(".json") and name not in used)
    return sidecars, orphans


# --------------------------------------------------------------------- planning (pure)
def clean_metadata(metadata: Mapping, data_key: str) -> tuple[dict, list[str]]:
    """Metadata safe to merge into task data: the image field is never overwritten."""
    warnings = []
    cleaned = dict(metadata)
    if data_key in cleaned:
        cleaned.pop(data_key)
        warnings.append(f"metadata field {data_key!r} ignored (it is the task's image)")
    return cleaned, warnings


def plan_import(
    bucket: str,
    images: Sequence[str],
    metadata: Mapping[str, Mapping],
    existing_uris: Iterable[str],
    metadata_without_image: Sequence[str] = (),
    data_key: str = "image",
    warnings: Sequence[str] = (),
    held_back: Mapping[str, str] | None = None,
) -> ImportPlan:
    """New tasks for `images` (object names) not already in the project (`existing_uris`: the
    gs:// URIs in existing tasks' data[data_key]), each with its metadata when there is some.
    held_back: {image: why} images not to import this run (see `held_back_images`)."""
    existing = {uri.strip() for uri in existing_uris if isinstance(uri, str)}
    held_back = held_back or {}
    tasks, already, without, failed = [], [], [], []
    notes = list(warnings)
    for name in sorted(set(images)):
        uri = gs_uri(bucket, name)
        if name not in metadata:
            without.append(name)
        if uri in existing:
            already.append(name)
            continue
        if name in held_back:
            failed.append(f"{name}: {held_back[name]}")
            continue
        extra, problems = clean_metadata(metadata.get(name, {}), data_key)
        notes.extend(f"{name}: {problem}" for problem in problems)
        tasks.append({data_key: uri, **extra})
    notes.extend(reserved_key_warnings(key for task in tasks for key in task))
    return ImportPlan(
        images=tuple(sorted(set(images))),
        tasks=tuple(tasks),
        already_imported=tuple(already),
        without_metadata=tuple(without),
        metadata_without_image=tuple(sorted(metadata_without_image)),
        warnings=tuple(notes),
        failed=tuple(failed),
    )


def held_back_images(
    bucket: str,
    prefix: str,
    images: Sequence[str],
    metadata: Mapping[str, Mapping],
    manifest: Manifest | None,
    sidecars: Mapping[str, str],
    sidecar_errors: Mapping[str, str],
) -> dict[str, str]:
    """{image: why} for images whose metadata could not be used: their manifest row or sidecar
    failed, or (when the manifest has rows without a readable key) they have no metadata at all.

    A task created without its metadata would never get it (reruns skip imported images), so
    these wait for a rerun with the metadata fixed.
    """
    names = set(images)
    held: dict[str, str] = {}
    for image, sidecar in sidecars.items():
        if sidecar in sidecar_errors and image in names:
            held[image] = f"sidecar {sidecar_errors[sidecar]}"
    if manifest is not None:
        for key, why in manifest.failed.items():
            resolved = resolve_key(key, bucket, prefix, names)
            if resolved is not None:
                held[resolved] = why
        if manifest.lost:
            why = (
                f"no metadata, and the manifest has {len(manifest.lost)} unreadable row(s) that may be "
                f"this image's ({manifest.lost[0]})"
            )
            for image in names - set(metadata) - set(held):
                held[image] = why
    return held


def gather_metadata(
    bucket: str,
    prefix: str,
    object_names: Sequence[str],
    manifest: Manifest | None,
    sidecar_documents: Mapping[str, dict],
    sidecars: Mapping[str, str],
    orphan_sidecars: Sequence[str],
) -> tuple[dict[str, dict], list[str]]:
    """Per-image metadata ({object name: metadata}) and the metadata that matched no image
    (manifest keys as written, sidecar object names). Manifest values win over sidecar values."""
    images = {name for name in object_names if is_image_name(name)}
    metadata: dict[str, dict] = {}
    for image, sidecar in sidecars.items():
        if sidecar in sidecar_documents:  # an unreadable sidecar leaves its image without metadata
            metadata[image] = dict(sidecar_documents[sidecar])
    unmatched = list(orphan_sidecars)
    if manifest is not None:
        for key, row in manifest.rows.items():
            name = resolve_key(key, bucket, prefix, images)
            if name is None:
                unmatched.append(key)
                continue
            metadata[name] = {**metadata.get(name, {}), **row}
        # Unusable rows of images that exist hold those images back (held_back_images).
        unmatched += [key for key in manifest.failed if resolve_key(key, bucket, prefix, images) is None]
    return metadata, unmatched


def format_report(plan: ImportPlan, source: str, imported: int | None, dry_run: bool) -> str:
    """The summary printed at the end of a run."""
    lines = [
        f"images found:            {len(plan.images)} under {source}",
        f"with metadata:           {len(plan.images) - len(plan.without_metadata)}",
        f"already in the project:  {len(plan.already_imported)}",
    ]
    if dry_run:
        lines.append(f"would import:            {len(plan.tasks)} (dry run: nothing changed)")
    else:
        lines.append(f"imported:                {imported or 0}")
    lines.append(_problem_line("images without metadata", plan.without_metadata))
    lines.append(_problem_line("metadata without images", plan.metadata_without_image))
    if plan.failed:
        lines.append(_problem_line("failed (not imported)", [line.split(": ", 1)[0] for line in plan.failed]))
    return "\n".join(lines)


def _problem_line(title: str, names: Sequence[str]) -> str:
    if not names:
        return f"{title + ':':25}0"
    shown = ", ".join(names[:SHOWN]) + (f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else "")
    return f"{title + ':':25}{len(names)}: {shown}"


# --------------------------------------------------------------------- I/O
def read_manifest(location: str, client, key_field: str | None) -> Manifest:
    """Read a manifest from a local path or gs:// URI."""
    if location.startswith("gs://"):
        bucket, name = parse_gs_uri(location)
        if not name:
            raise UserError(f"--manifest {location} names a bucket, not an object")
        text = read_object(client, bucket, name).decode("utf-8-sig", errors="replace")
    else:
        try:
            text = Path(location).read_text(encoding="utf-8-sig")
        except OSError as error:
            raise UserError(f"cannot read manifest {location}: {error.strerror}") from None
    return parse_manifest(text, manifest_format(location), key_field, name=posixpath.basename(location))


def read_sidecars(client, bucket: str, names: Iterable[str], progress: bool) -> tuple[dict[str, dict], dict[str, str]]:
    """({sidecar name: JSON object}, {sidecar name: why it cannot be used}); a malformed sidecar
    holds back its image (see `held_back_images`), the rest goes on. GCS failing to answer is
    fatal (UserError) before anything is imported: a task created without its metadata would never
    get it, since reruns skip images already imported."""
    documents: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for name in tqdm(sorted(set(names)), desc="reading sidecars", unit="file", disable=not progress):
        content = read_object(client, bucket, name)
        try:
            document = _json_object(content.decode("utf-8-sig"), name)
        except (UserError, UnicodeDecodeError) as error:
            errors[name] = str(error) if isinstance(error, UserError) else f"{name} is not UTF-8 text"
            continue
        problem = metadata_problem(document)
        if problem is None:
            documents[name] = document
        else:
            errors[name] = f"{name}: {problem}"
    return documents, errors


def existing_image_uris(conn: LabelStudioConnection, project_id: int, data_key: str) -> set[str]:
    return {
        original_uri(str(task.get("data", {}).get(data_key)))
        for task in iter_tasks(conn, project_id, fields="task_only")
        if task.get("data", {}).get(data_key)
    }


def import_tasks(
    conn: LabelStudioConnection, project_id: int, tasks: Sequence[dict], batch_size: int, progress: bool
) -> list[int]:
    """Create `tasks` in batches; returns the new task ids."""
    ids: list[int] = []
    with tqdm(total=len(tasks), desc="importing", unit="task", disable=not progress) as bar:
        for batch in batched(list(tasks), batch_size):
            response = conn.call(
                conn.ls.projects.import_tasks,
                id=project_id,
                request=list(batch),
                return_task_ids=True,
                what=f"import {len(batch)} tasks into project {project_id}",
            )
            ids.extend(int(i) for i in (getattr(response, "task_ids", None) or []))
            bar.update(len(batch))
    return ids


# --------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdk_scripts.import_gcs",
        description="Create Label Studio tasks {image: gs://..., ...metadata} for the images under a GCS "
        "prefix; only new images are imported. Auth: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY; "
        "GCS: Application Default Credentials, --gcs-credentials or STORAGE_EMULATOR_HOST.",
    )
    add_label_studio_arguments(parser)
    add_gcs_arguments(parser)
    parser.add_argument("--project", required=True, help="project id or exact title")
    parser.add_argument("--source", required=True, metavar="gs://BUCKET/PREFIX", help="where the images are")
    parser.add_argument(
        "--manifest",
        default=None,
        metavar="PATH|gs://...",
        help="metadata per image: CSV, JSON lines or JSON, keyed by object name",
    )
    parser.add_argument("--key-field", default=None, help="the manifest's key column (default: guessed)")
    parser.add_argument("--no-sidecars", action="store_true", help="ignore per-image JSON sidecars")
    parser.add_argument(
        "--require-metadata", action="store_true", help="fail (importing nothing) when an image has no metadata"
    )
    parser.add_argument("--data-key", default="image", help="task data field of the image (default: image)")
    parser.add_argument("--batch-size", type=int, default=250, help="tasks per import request (default 250)")
    parser.add_argument("--dry-run", action="store_true", help="show what would be imported; change nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace, settings: CliSettings) -> int:
    progress = not args.no_progress
    bucket, prefix = parse_gs_uri(args.source)
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    conn = connect_label_studio(settings, args.url)
    project_id = find_project(conn, args.project)
    client = gcs_client(settings, args.gcs_credentials)
    require_bucket(client, bucket)

    object_names = list_objects(client, bucket, prefix)
    manifest = read_manifest(args.manifest, client, args.key_field) if args.manifest else None
    manifest_object = parse_gs_uri(args.manifest)[1] if args.manifest and args.manifest.startswith("gs://") else ""
    candidates = [name for name in object_names if name != manifest_object]
    sidecars: dict[str, str]
    orphans: list[str]
    documents: dict[str, dict]
    sidecar_errors: dict[str, str]
    if args.no_sidecars:
        sidecars, orphans, documents, sidecar_errors = {}, [], {}, {}
    else:
        sidecars, orphans = pair_sidecars(candidates)
        documents, sidecar_errors = read_sidecars(client, bucket, sidecars.values(), progress)
    images = [name for name in candidates if is_image_name(name)]
    metadata, unmatched = gather_metadata(bucket, prefix, candidates, manifest, documents, sidecars, orphans)
    held_back = held_back_images(bucket, prefix, images, metadata, manifest, sidecars, sidecar_errors)
    existing = existing_image_uris(conn, project_id, args.data_key)
    plan = plan_import(
        bucket,
        images,
        metadata,
        existing,
        unmatched,
        args.data_key,
        warnings=manifest_warnings(manifest),
        held_back=held_back,
    )
    source = f"gs://{bucket}/{prefix}".rstrip("/")
    for warning in plan.warnings:
        print(f"warning: {warning}")
    if not images:
        print(f"warning: no image objects under {source}")
    if args.require_metadata and plan.without_metadata:
        raise UserError(
            f"{len(plan.without_metadata)} image(s) have no metadata (--require-metadata), "
            f"nothing imported: {', '.join(plan.without_metadata[:SHOWN])}"
        )
    for line in plan.failed:
        print(f"failed: {line}")
    if args.dry_run:
        for task in plan.tasks[:SHOWN]:
            print(f"would import: {json.dumps(task, default=str, allow_nan=False)}")
        print(format_report(plan, source, None, dry_run=True))
        return 1 if plan.failed else 0
    ids = import_tasks(conn, project_id, plan.tasks, args.batch_size, progress) if plan.tasks else []
    print(format_report(plan, source, len(ids) or len(plan.tasks), dry_run=False))
    print(f"project {project_id}: {conn.project_url(project_id)}")
    return 1 if plan.failed else 0


def manifest_warnings(manifest: Manifest | None) -> list[str]:
    """The manifest's warnings, and one line per row that could not be read (rows that were read
    but cannot be used are reported with their image, as failed)."""
    if manifest is None:
        return []
    return [*manifest.warnings, *(f"unreadable row: {why}" for why in manifest.lost)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: run(args, configured_settings()))


if __name__ == "__main__":
    raise SystemExit(main())
