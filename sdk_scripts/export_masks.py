"""Export a project's annotations as image + class-index mask PNG pairs, for training.

    python -m sdk_scripts.export_masks --project "Nuclei" --out exported/
    python -m sdk_scripts.export_masks --project 3 --from-bucket gs://labels/v1 --out exported/

Written under ``--out``:

- ``images/<stem>.png``: the task's image, RGB, EXIF orientation applied (as Label Studio shows it);
- ``masks/<stem>.png``: HxW uint8 class indices, 0 = background, k = the k-th label of the label map;
- ``label_map.json``: ``{"Nucleus": 1, "Cell": 2}``, the labels of the config's BrushLabels and
  PolygonLabels tags (or of the Labels tag its Brush / Polygon tools share) in document order
  (pixel value = index);
- ``overlays/<stem>.png``: the image with the mask blended in colour, for a quick visual check;
- ``tasks.json``: for each stem, the task id, image URI, annotation id and any warnings.

These five entries are managed by the export: each run writes them into ``OUT/.export-staging`` and
then swaps them in, so after a run they hold exactly that run's pairs (nothing left from an earlier
export: cancelled annotations, renamed images, tasks that failed this time). Anything else under
``--out`` is left alone. An interrupted run leaves the previous export in place.

This is the layout the segmentation trainer reads:
``python -m segmentation.train --images OUT/images --masks OUT/masks --labels Nucleus,Cell --out MODEL_DIR``,
and `sdk_scripts.mask_dataset.MaskDataset(OUT)` loads it in PyTorch.

Per task, the newest annotation that was not cancelled (skipped) is used. Brush RLE is decoded and
polygons are rasterised (even-odd fill, non-convex shapes and holes are exact) by
``backends.label_studio.regions.results_to_class_mask``. Where regions overlap, ``--overlap`` decides:
``later`` (default; the region later in the annotation, i.e. drawn last, wins), ``earlier`` (the
first one wins) or ``smaller`` (the smaller region wins, so a nucleus drawn over its cell survives).

Annotations come from Label Studio's export API (default) or, with ``--from-bucket``, from the JSON
objects Label Studio's export storage wrote to the target bucket (one per annotation, or one per task
when Label Studio runs with FUTURE_SAVE_TASK_TO_STORAGE). Images are read through Label Studio
(uploads with the API key, ``gs://`` via its resolve endpoint), or directly from GCS with
``--gcs-direct`` when this machine has credentials. Output names come from the image's file name,
sanitised (no path traversal), with ``-<task id>`` added where two images share a name.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import shlex
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeGuard

import numpy as np
from PIL import Image
from tqdm import tqdm

from backends.label_studio.annotations import newest_annotation
from sdk_scripts.common import (
    CliSettings,
    LabelStudioConnection,
    UserError,
    add_gcs_arguments,
    add_label_studio_arguments,
    configured_settings,
    connect_label_studio,
    find_project,
    gcs_client,
    list_objects,
    original_uri,
    parse_gs_uri,
    read_object,
    require_bucket,
    run_main,
    unique_stems,
)

OVERLAP_RULES = ("later", "earlier", "smaller")
# What an export writes under --out; replaced as a whole by each run (see the module docstring).
MANAGED_ENTRIES = ("images", "masks", "overlays", "label_map.json", "tasks.json")
STAGING_DIR = ".export-staging"
PREVIOUS_DIR = ".export-previous"
# A malformed stored object or annotation raises these deep in parsing: one item fails, not the run.
DATA_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError)
# Reads that fail one after another mean GCS itself is failing, not one bad object: stop.
MAX_CONSECUTIVE_READ_FAILURES = 10
# Distinct colours for class 1, 2, ... (class 0, background, is not painted).
PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [170, 110, 40],
    ],
    dtype=np.uint8,
)


@dataclass(frozen=True)
class TaskExport:
    """One task to export: its id, image URI (as stored, e.g. gs://...) and chosen annotation."""

    task_id: int
    image_uri: str
    annotation: dict
    stem: str = ""


@dataclass
class ExportSummary:
    exported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------- pure helpers
def label_map_from_config(label_config: str) -> dict[str, int]:
    """{label: class index} from the brush and polygon tags, 1-based in document order."""
    from backends.errors import BackendError
    from backends.label_studio.label_config import parse_label_config

    try:
        labels = parse_label_config(label_config).output_labels()
    except BackendError as error:
        raise UserError(f"the project's label config cannot be read: {error.message}") from None
    if not labels:
        raise UserError(
            "the project's label config has no BrushLabels or PolygonLabels labels to export "
            "(nor Brush / Polygon tools sharing a Labels tag)"
        )
    if len(labels) > 255:
        raise UserError(f"{len(labels)} labels do not fit a uint8 mask (at most 255)")
    return {label: index for index, label in enumerate(labels, start=1)}


def image_data_key(label_config: str) -> str:
    """The task data key (``$image`` -> "image") of the Image tag the brush and polygon tags draw
    on (the config's first Image tag when none does; "image" when it has none)."""
    from backends.label_studio.label_config import parse_label_config

    config = parse_label_config(label_config)
    image = config.primary_image()
    return config.images[image] if image else next(iter(config.images.values()), "image")


def tasks_from_storage_objects(documents: Iterable[Mapping], problems: list[str] | None = None) -> list[dict]:
    """Export-storage JSON objects -> tasks ``{"id", "data", "annotations": [...]}``.

    An object is either one annotation with its task nested under "task" (Label Studio's default) or
    one task with its "annotations" (FUTURE_SAVE_TASK_TO_STORAGE). Annotations of the same task are
    gathered; the same annotation seen twice is kept once. Other JSON is ignored; a malformed
    object is left out with one line in `problems` (when given).
    """
    tasks: dict[int, dict] = {}
    for number, document in enumerate(documents, start=1):
        try:
            parts = storage_object_parts(document)
        except ValueError as error:
            if problems is not None:
                problems.append(f"stored object {number}: {error}: skipped")
            continue
        if parts is not None:
            add_storage_task(tasks, *parts)
    return [tasks[key] for key in sorted(tasks)]


def storage_object_parts(document) -> tuple[int, Mapping, list[dict]] | None:
    """(task id, task data, annotations) of one export-storage object; None when the JSON is not one.

    Raises ValueError naming what is malformed (a task id that is not a whole number, data that is
    not an object, annotations that are not a list of objects).
    """
    if not isinstance(document, Mapping):
        return None
    if "annotations" in document and "data" in document:
        task_part, annotations = document, document.get("annotations") or []
    elif isinstance(document.get("task"), Mapping) and "result" in document:
        task_part, annotations = document["task"], [{k: v for k, v in document.items() if k != "task"}]
    else:
        return None
    task_id = task_part.get("id")
    if task_id is None:
        return None
    data = task_part.get("data") or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"task {task_id!r}: data is a {type(data).__name__}, not an object")
    if not isinstance(annotations, list) or not all(isinstance(a, Mapping) for a in annotations):
        raise ValueError(f"task {task_id!r}: annotations are not a list of objects")
    return whole_number(task_id, "task id"), data, annotations


def add_storage_task(tasks: dict[int, dict], task_id: int, data: Mapping, annotations: list[dict]) -> None:
    """Gather one object's annotations into tasks[task_id], each annotation id once."""
    task = tasks.setdefault(task_id, {"id": task_id, "data": dict(data), "annotations": []})
    known = {_annotation_key(a) for a in task["annotations"]} - {None}
    for annotation in annotations:
        key = _annotation_key(annotation)
        if key is None or key not in known:
            task["annotations"].append(annotation)
            known.add(key)


def _annotation_key(annotation: Mapping):
    key = annotation.get("id")
    return key if isinstance(key, (int, str)) and not isinstance(key, bool) else None


def whole_number(value, what: str) -> int:
    """An int from an int or a string of digits (ids in stored JSON); ValueError naming `what`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 18:
        return int(value)
    raise ValueError(f"{what} {str(value)[:40]!r} is not a whole number")


def select_exports(tasks: Iterable[Mapping], data_key: str) -> tuple[list[TaskExport], list[str]]:
    """Tasks with a usable annotation -> TaskExports with unique safe stems; and what was skipped."""
    chosen: list[TaskExport] = []
    skipped: list[str] = []
    for task in tasks:
        try:
            task_id = whole_number(task.get("id") if isinstance(task, Mapping) else None, "task id")
        except ValueError as error:
            skipped.append(f"a task without a usable id: {error}")
            continue
        data = task.get("data")
        value = data.get(data_key) if isinstance(data, Mapping) else None
        uri = original_uri(value) if isinstance(value, str) else ""
        annotation = newest_annotation(task.get("annotations") or [])
        if not uri:
            skipped.append(f"task {task_id}: no {data_key!r} in its data")
        elif annotation is None:
            skipped.append(f"task {task_id}: no annotation (or only cancelled ones)")
        else:
            chosen.append(TaskExport(task_id, uri, annotation))
    chosen.sort(key=lambda item: item.task_id)
    stems = unique_stems(
        [posixpath.basename(item.image_uri.split("?", 1)[0]) for item in chosen], [item.task_id for item in chosen]
    )
    return [replace(item, stem=stem) for item, stem in zip(chosen, stems, strict=True)], skipped


def image_size_from_results(results: Sequence[Mapping]) -> tuple[int, int] | None:
    """(height, width) from the first region with positive whole original_height/original_width."""
    for region in results:
        if isinstance(region, Mapping):
            height, width = region.get("original_height"), region.get("original_width")
            if _positive_int(height) and _positive_int(width):
                return height, width
    return None


def _positive_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """HxWx3 uint8 image with HxW uint8 class mask blended in (class k in PALETTE[k-1]); background untouched."""
    out = image.astype(np.float32)
    labelled = mask > 0
    colours = PALETTE[(mask[labelled].astype(np.int64) - 1) % len(PALETTE)].astype(np.float32)
    out[labelled] = (1 - alpha) * out[labelled] + alpha * colours
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> None:
    """HxW uint8 (mode L) or HxWx3 uint8 (RGB) to a PNG, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    Image.fromarray(np.ascontiguousarray(pixels)).save(partial, format="PNG")
    partial.replace(path)


# --------------------------------------------------------------------- reading annotations
def tasks_from_api(conn: LabelStudioConnection, project_id: int) -> list[dict]:
    """Annotated tasks of a project from Label Studio's JSON export."""
    what = f"export the annotations of project {project_id}"
    chunks = conn.call(
        conn.ls.projects.exports.download_sync, id=project_id, export_type="JSON", download_all_tasks=False, what=what
    )
    payload = conn.call(lambda: b"".join(chunks), what=what)
    try:
        tasks = json.loads(payload)
    except json.JSONDecodeError as error:
        raise UserError(f"Label Studio's export of project {project_id} is not JSON: {error}") from None
    if not isinstance(tasks, list):
        raise UserError(f"Label Studio's export of project {project_id} is not a list of tasks")
    return tasks


def tasks_from_bucket(client, location: str, project_id: int | None, progress: bool) -> tuple[list[dict], list[str]]:
    """Tasks rebuilt from the export storage's JSON objects under `location` (gs://bucket/prefix).

    Returns (tasks, failures): one line per object that could not be read or is malformed; the
    others are used. Raises UserError when reads keep failing (GCS itself is down or refuses).
    """
    bucket, prefix = parse_gs_uri(location)
    require_bucket(client, bucket)
    tasks: dict[int, dict] = {}
    failures: list[str] = []
    failing_reads = 0
    for name in tqdm(
        list_objects(client, bucket, prefix), desc="reading annotations", unit="object", disable=not progress
    ):
        try:
            content = read_object(client, bucket, name)
            failing_reads = 0
        except UserError as error:
            failing_reads += 1
            if failing_reads >= MAX_CONSECUTIVE_READ_FAILURES:
                raise UserError(f"{failing_reads} objects in a row could not be read, the last: {error}") from None
            failures.append(f"gs://{bucket}/{name}: {error}")
            continue
        try:
            parts = _stored_annotation(content, project_id)
        except DATA_ERRORS + (UnicodeDecodeError,) as error:
            failures.append(f"gs://{bucket}/{name}: {_describe_data_error(error)}: skipped")
            continue
        if parts is not None:
            add_storage_task(tasks, *parts)
    return [tasks[key] for key in sorted(tasks)], failures


def _stored_annotation(content: bytes, project_id: int | None) -> tuple[int, Mapping, list[dict]] | None:
    """One stored object's (task id, data, annotations); None for other JSON or another project's.

    Raises ValueError (not JSON, malformed), RecursionError (nested too deep) or UnicodeDecodeError.
    """
    try:
        document = json.loads(content)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error})") from None
    if project_id is not None and isinstance(document, Mapping):
        task = document.get("task")
        owner = document.get("project") or (task.get("project") if isinstance(task, Mapping) else None)
        if owner is not None and whole_number(owner, "project id") != project_id:
            return None  # another project writes to the same prefix
    return storage_object_parts(document)


def _describe_data_error(error: BaseException) -> str:
    """One line for an error raised by malformed stored data."""
    if isinstance(error, RecursionError):
        return "nested too deeply to read"
    if isinstance(error, UnicodeDecodeError):
        return "not UTF-8 text"
    text = " ".join(str(error).split())[:200]
    return text if isinstance(error, (ValueError, UserError)) else f"malformed ({type(error).__name__}: {text})"


# --------------------------------------------------------------------- writing
def export_task(
    item: TaskExport,
    label_map: Mapping[str, int],
    out: Path,
    overlap: str,
    fetcher,
    with_images: bool,
    max_polygon_vertices: int | None = None,
) -> list[str]:
    """Write one task's files; returns warnings (regions skipped, ...). Raises BackendError/UserError.

    max_polygon_vertices: POLYGON_MAX_VERTICES (None: the backends' default).
    """
    from backends.label_studio.regions import results_to_class_mask
    from backends.masks.polygons import DEFAULT_MAX_VERTICES

    results = item.annotation.get("result") or []
    if with_images:
        loaded = fetcher.load(item.image_uri, item.task_id)
        image = loaded.pixels
        height, width = image.shape[:2]
    else:
        size = image_size_from_results(results)
        if size is None:
            raise UserError("no region carries the image size; export with images")
        (height, width), image = size, None
    mask, warnings = results_to_class_mask(
        results,
        label_map,
        height,
        width,
        overlap=overlap,
        max_polygon_vertices=max_polygon_vertices or DEFAULT_MAX_VERTICES,
    )
    write_png(out / "masks" / f"{item.stem}.png", mask)
    if image is not None:
        write_png(out / "images" / f"{item.stem}.png", image)
        write_png(out / "overlays" / f"{item.stem}.png", overlay(image, mask))
    return warnings


def image_fetcher(settings: CliSettings, base_url: str, gcs_direct: bool):
    """The backends' ImageFetcher, pointed at Label Studio with the script's API key, no disk cache."""
    from backends.images.fetcher import ImageFetcher
    from backends.settings import Settings

    return ImageFetcher(
        Settings(
            label_studio_url=base_url,
            label_studio_api_key=settings.label_studio_api_key,
            image_cache_mb=0.0,
            gcs_direct_read=gcs_direct,
        )
    )


def export_project(
    tasks: Sequence[Mapping],
    label_config: str,
    out: Path,
    overlap: str,
    fetcher,
    with_images: bool = True,
    progress: bool = True,
    data_key: str | None = None,
    max_polygon_vertices: int | None = None,
) -> ExportSummary:
    """Write the files for every task with a usable annotation; label_map.json and tasks.json too.

    The managed entries under `out` (MANAGED_ENTRIES) end up holding exactly this export; a task
    that fails is reported in the summary and the others go on.
    """
    from backends.errors import BackendError

    label_map = label_map_from_config(label_config)
    items, skipped = select_exports(tasks, data_key or image_data_key(label_config))
    summary = ExportSummary(skipped=skipped)
    with staged_output(out) as staging:
        (staging / "label_map.json").write_text(json.dumps(label_map, indent=2) + "\n", encoding="utf-8")
        index = []
        for item in tqdm(items, desc="exporting", unit="task", disable=not progress):
            try:
                warnings = export_task(item, label_map, staging, overlap, fetcher, with_images, max_polygon_vertices)
            except (BackendError, UserError) as error:
                summary.failed.append(f"task {item.task_id} ({item.image_uri}): {getattr(error, 'message', error)}")
                continue
            except DATA_ERRORS as error:
                summary.failed.append(
                    f"task {item.task_id} ({item.image_uri}): annotation {item.annotation.get('id')} "
                    f"is {_describe_data_error(error)}"
                )
                continue
            summary.exported.append(item.stem)
            summary.warnings.extend(f"task {item.task_id}: {warning}" for warning in warnings)
            index.append(
                {
                    "stem": item.stem,
                    "task_id": item.task_id,
                    "image": item.image_uri,
                    "annotation_id": item.annotation.get("id"),
                    "warnings": warnings,
                }
            )
        (staging / "tasks.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return summary


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A fresh staging folder inside `out`; on success its entries replace out's managed entries.

    Managed entries of an earlier export that this one did not write (overlays/ after --masks-only,
    say) are removed too; nothing outside MANAGED_ENTRIES is touched. On an exception the staging
    folder is removed and `out` keeps the previous export.
    """
    out.mkdir(parents=True, exist_ok=True)
    staging, previous = out / STAGING_DIR, out / PREVIOUS_DIR
    for leftover in (staging, previous):  # from an interrupted run
        _remove(leftover)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    previous.mkdir()
    for name in MANAGED_ENTRIES:
        if (out / name).exists() or (out / name).is_symlink():
            os.replace(out / name, previous / name)
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    _remove(previous)
    _remove(staging)


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree of ours (links are removed, never followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def train_command(out: Path, labels: Sequence[str]) -> tuple[str, list[str]]:
    """The `segmentation.train` command line for an export in `out`, and notes about it.

    Shell-quoted, and `--labels` is what segmentation.train parses back to exactly `labels` (it
    splits on commas and strips spaces). Labels it cannot carry (a comma, surrounding spaces) leave
    `--labels` out, and a note says why.
    """
    command = ["python", "-m", "segmentation.train", "--images", str(out / "images"), "--masks", str(out / "masks")]
    unsafe = [label for label in labels if "," in label or label != label.strip() or not label]
    notes = []
    if unsafe:
        notes.append(
            f"label(s) {', '.join(repr(label) for label in unsafe)} cannot be passed to segmentation.train "
            "--labels (it splits on commas and strips spaces); without --labels the model's classes are "
            f"named class1..class{len(labels)}: rename the label(s) in Label Studio to train with their names "
            "(label_map.json has the exact names)"
        )
    else:
        command += ["--labels", ",".join(labels)]
    command += ["--out", "MODEL_DIR"]
    return " ".join(shlex.quote(part) for part in command), notes


# --------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdk_scripts.export_masks",
        description="Export a Label Studio project's annotations as images/, masks/ (uint8 class-index PNG), "
        "overlays/ and label_map.json, the layout `python -m segmentation.train` reads. "
        "Auth: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY.",
    )
    add_label_studio_arguments(parser)
    add_gcs_arguments(parser)
    parser.add_argument("--project", required=True, help="project id or exact title")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--from-bucket",
        default=None,
        metavar="gs://BUCKET/PREFIX",
        help="read annotations from the export storage's JSON objects instead of the API",
    )
    parser.add_argument(
        "--overlap",
        choices=OVERLAP_RULES,
        default="later",
        help="which region wins where regions overlap: later (drawn last, default), earlier, or smaller",
    )
    parser.add_argument(
        "--gcs-direct",
        action="store_true",
        help="read gs:// images directly with this machine's GCS credentials (default: through Label Studio)",
    )
    parser.add_argument(
        "--masks-only", action="store_true", help="write masks and label_map.json only (no image download, no overlays)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace, settings: CliSettings) -> int:
    progress = not args.no_progress
    conn = connect_label_studio(settings, args.url)
    project_id = find_project(conn, args.project)
    project = conn.call(conn.ls.projects.get, id=project_id, what=f"read project {project_id}")
    unreadable: list[str] = []
    if args.from_bucket:
        client = gcs_client(settings, args.gcs_credentials)
        tasks, unreadable = tasks_from_bucket(client, args.from_bucket, project_id, progress)
    else:
        tasks = tasks_from_api(conn, project_id)
    fetcher = None if args.masks_only else image_fetcher(settings, conn.url, args.gcs_direct)
    summary = export_project(
        tasks,
        project.label_config or "",
        args.out,
        args.overlap,
        fetcher,
        with_images=not args.masks_only,
        progress=progress,
        max_polygon_vertices=settings.polygon_max_vertices,
    )
    return report(summary, unreadable, args.out, with_images=not args.masks_only)


def report(summary: ExportSummary, unreadable: Sequence[str], out: Path, with_images: bool) -> int:
    """Print what the export did; exit status 1 when a stored object or a task failed, else 0."""
    for line in summary.warnings:
        print(f"warning: {line}")
    for line in summary.skipped:
        print(f"skipped: {line}")
    for line in list(unreadable) + summary.failed:
        print(f"failed: {line}")
    failed = len(unreadable) + len(summary.failed)
    print(
        f"exported {len(summary.exported)} task(s) to {out} ({len(summary.skipped)} skipped, {failed} failed"
        + (f": {len(unreadable)} stored object(s) unreadable" if unreadable else "")
        + ")"
    )
    if summary.exported and with_images:
        labels = list(json.loads((out / "label_map.json").read_text(encoding="utf-8")))
        command, notes = train_command(out, labels)
        for note in notes:
            print(f"note: {note}")
        print(f"train: {command}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: run(args, configured_settings()))


if __name__ == "__main__":
    raise SystemExit(main())
