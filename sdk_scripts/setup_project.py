"""Create or update a Label Studio project, its GCS storages and its ML backends. Idempotent.

    python -m sdk_scripts.setup_project --title "Nuclei" --source gs://raw/images --target gs://labels/v1

What it connects (found again by title / bucket+prefix / URL on the next run, and updated only where
something differs, so running it twice changes nothing):

- the project, from a label-config file (default: label_config.xml at the repository root);
- the source bucket/prefix as GCS *import* storage, ``use_blob_urls`` on, a regex for image files,
  presigned URLs (``--presign``) or reads proxied through Label Studio (``--no-presign``, the default:
  the bucket stays private and emulators work);
- the target bucket/prefix as GCS *export* storage: Label Studio writes one JSON object per annotation
  there when it is submitted;
- the segmentation backend (``--seg-url``, default http://localhost:7070) and the SAM backend
  (``--sam-url``, default http://localhost:9090, interactive). Label Studio checks their /health when
  connecting: start them first, or pass ``--skip-backends``.

Tasks are created by ``sdk_scripts.import_gcs`` (with per-image metadata), not by syncing the import
storage: the import storage is there so Label Studio can resolve ``gs://`` URLs (presign or proxy).
It is connected with ``synchronizable`` off, so Label Studio refuses a "Sync" that would duplicate
the tasks import_gcs made. ``--allow-sync`` turns it on (tasks from a sync carry no metadata;
import_gcs still skips images that a sync already imported).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from sdk_scripts.common import (
    DEFAULT_LABEL_CONFIG,
    CliSettings,
    LabelStudioConnection,
    UserError,
    add_label_studio_arguments,
    configured_settings,
    connect_label_studio,
    label_config_warnings,
    list_projects,
    parse_gs_uri,
    project_id_of,
    run_main,
)

IMAGE_REGEX = r"(?i).*\.(png|jpe?g|tiff?|bmp|webp|gif)$"
MANAGED_BY = "managed by sdk_scripts.setup_project"
SEG_TITLE = "Segmentation (U-Net)"
SAM_TITLE = "Segment Anything (interactive)"


@dataclass(frozen=True)
class BackendSpec:
    url: str
    title: str
    is_interactive: bool


@dataclass(frozen=True)
class SetupOptions:
    """What the project should look like. Buckets are (bucket, prefix) pairs; None leaves them out."""

    title: str
    label_config: str
    source: tuple[str, str] | None = None
    target: tuple[str, str] | None = None
    presign: bool = False
    presign_ttl_minutes: int = 15
    regex_filter: str = IMAGE_REGEX
    allow_sync: bool = False
    storage_credentials: str = field(default="", repr=False)  # key-file content handed to Label Studio
    google_project_id: str = ""
    backends: tuple[BackendSpec, ...] = ()
    basic_auth_user: str = ""
    basic_auth_pass: str = field(default="", repr=False)


@dataclass(frozen=True)
class Change:
    """What one run did to one object: action is "created", "updated" or "unchanged"."""

    kind: str
    id: int
    action: str
    detail: str = ""


# --------------------------------------------------------------------- pure helpers
def normalise_xml(text: str) -> str:
    """Label config text compared without insignificant whitespace between tags."""
    return re.sub(r">\s+<", "><", text.strip())


def fields_to_update(current: Mapping, desired: Mapping) -> dict:
    """The entries of `desired` whose value differs from `current` (missing counts as different)."""
    return {key: value for key, value in desired.items() if key not in current or current[key] != value}


def credentials_fingerprint(credentials: str) -> str:
    """A short, non-reversible fingerprint of a key file's content (Label Studio never returns the key,
    so the fingerprint, kept in the storage description, tells whether it changed)."""
    if not credentials:
        return ""
    return "key sha256:" + hashlib.sha256(credentials.encode("utf-8")).hexdigest()[:12]


def storage_description(options: SetupOptions) -> str:
    fingerprint = credentials_fingerprint(options.storage_credentials)
    return f"{MANAGED_BY}; {fingerprint}" if fingerprint else MANAGED_BY


def same_url(a: str, b: str) -> bool:
    return (a or "").strip().rstrip("/").lower() == (b or "").strip().rstrip("/").lower()


# --------------------------------------------------------------------- Label Studio
def _as_dict(item) -> dict:
    return item.model_dump() if hasattr(item, "model_dump") else dict(item)


def ensure_project(conn: LabelStudioConnection, options: SetupOptions) -> Change:
    matches = [p for p in list_projects(conn) if (p.title or "") == options.title]
    if len(matches) > 1:
        ids = ", ".join(str(p.id) for p in matches)
        raise UserError(f"{len(matches)} projects are titled {options.title!r} (ids {ids}): rename all but one")
    if not matches:
        created = conn.call(
            conn.ls.projects.create,
            title=options.title,
            label_config=options.label_config,
            what=f"create project {options.title!r}",
        )
        return Change("project", project_id_of(created), "created", options.title)
    project_id = int(matches[0].id)
    current = conn.call(conn.ls.projects.get, id=project_id, what=f"read project {project_id}")
    if normalise_xml(current.label_config or "") == normalise_xml(options.label_config):
        return Change("project", project_id, "unchanged", options.title)
    conn.call(
        conn.ls.projects.update,
        id=project_id,
        label_config=options.label_config,
        what=f"update the label config of project {project_id} (Label Studio refuses changes that "
        "would drop labels already used in annotations)",
    )
    return Change("project", project_id, "updated", "label config")


def _ensure_storage(
    conn: LabelStudioConnection,
    client,
    kind: str,
    project_id: int,
    bucket: str,
    prefix: str,
    desired: dict,
    options: SetupOptions,
) -> Change:
    where = f"gs://{bucket}/{prefix}".rstrip("/")
    existing = [
        _as_dict(s) for s in conn.call(client.list, project=project_id, what=f"list {kind}s of project {project_id}")
    ]
    matches = [s for s in existing if s.get("bucket") == bucket and (s.get("prefix") or "").strip("/") == prefix]
    secrets = {"google_application_credentials": options.storage_credentials} if options.storage_credentials else {}
    if not matches:
        created = conn.call(
            client.create,
            project=project_id,
            bucket=bucket,
            prefix=prefix,
            **desired,
            **secrets,
            what=f"connect {where} as {kind}",
        )
        return Change(kind, int(created.id), "created", where)
    storage = matches[0]
    changed = fields_to_update(storage, desired)
    if not changed:
        return Change(kind, int(storage["id"]), "unchanged", where)
    if "description" in changed:
        changed.update(secrets)  # the fingerprint changed: hand over the new key
    conn.call(client.update, id=int(storage["id"]), **changed, what=f"update {kind} {where}")
    return Change(kind, int(storage["id"]), "updated", f"{where} ({', '.join(sorted(changed))})")


def ensure_import_storage(
    conn: LabelStudioConnection, project_id: int, source: tuple[str, str], options: SetupOptions
) -> Change:
    bucket, prefix = source
    desired = {
        "title": f"source gs://{bucket}/{prefix}".rstrip("/"),
        "description": storage_description(options),
        "presign": options.presign,
        "presign_ttl": options.presign_ttl_minutes,
        "regex_filter": options.regex_filter,
        "use_blob_urls": True,
        "recursive_scan": True,
        "synchronizable": options.allow_sync,
    }
    if options.google_project_id:
        desired["google_project_id"] = options.google_project_id
    return _ensure_storage(
        conn, conn.ls.import_storage.gcs, "import storage", project_id, bucket, prefix, desired, options
    )


def ensure_export_storage(
    conn: LabelStudioConnection, project_id: int, target: tuple[str, str], options: SetupOptions
) -> Change:
    bucket, prefix = target
    desired = {
        "title": f"target gs://{bucket}/{prefix}".rstrip("/"),
        "description": storage_description(options),
        "use_blob_urls": False,
        "can_delete_objects": False,
    }
    if options.google_project_id:
        desired["google_project_id"] = options.google_project_id
    return _ensure_storage(
        conn, conn.ls.export_storage.gcs, "export storage", project_id, bucket, prefix, desired, options
    )


def ensure_backend(conn: LabelStudioConnection, project_id: int, spec: BackendSpec, options: SetupOptions) -> Change:
    existing = [
        _as_dict(m)
        for m in conn.call(conn.ls.ml.list, project=project_id, what=f"list the ML backends of project {project_id}")
    ]
    matches = [m for m in existing if same_url(m.get("url", ""), spec.url)]
    desired: dict = {"title": spec.title, "is_interactive": spec.is_interactive}
    auth: dict = {}
    if options.basic_auth_user:
        desired.update(auth_method="BASIC_AUTH", basic_auth_user=options.basic_auth_user)
        auth = {"basic_auth_pass": options.basic_auth_pass}
    hint = "is the backend running? start it or pass --skip-backends"
    if not matches:
        created = conn.call(
            conn.ls.ml.create,
            project=project_id,
            url=spec.url,
            **desired,
            **auth,
            what=f"connect the ML backend {spec.url} ({hint})",
        )
        return Change("ml backend", int(created.id), "created", spec.url)
    backend = matches[0]
    changed = fields_to_update(backend, desired)
    if not changed:
        return Change("ml backend", int(backend["id"]), "unchanged", spec.url)
    conn.call(
        conn.ls.ml.update, id=int(backend["id"]), **changed, **auth, what=f"update the ML backend {spec.url} ({hint})"
    )
    return Change("ml backend", int(backend["id"]), "updated", f"{spec.url} ({', '.join(sorted(changed))})")


def setup_project(conn: LabelStudioConnection, options: SetupOptions, progress: bool = True) -> list[Change]:
    """Bring the project to `options`; returns one `Change` per object, project first."""
    steps = 1 + (options.source is not None) + (options.target is not None) + len(options.backends)
    changes: list[Change] = []
    with tqdm(total=steps, desc="setting up", unit="step", disable=not progress) as bar:
        project = ensure_project(conn, options)
        changes.append(project)
        bar.update()
        if options.source is not None:
            changes.append(ensure_import_storage(conn, project.id, options.source, options))
            bar.update()
        if options.target is not None:
            changes.append(ensure_export_storage(conn, project.id, options.target, options))
            bar.update()
        for spec in options.backends:
            changes.append(ensure_backend(conn, project.id, spec, options))
            bar.update()
    return changes


# --------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdk_scripts.setup_project",
        description="Create or update a Label Studio project with GCS storages and the two ML backends "
        "(idempotent). Auth: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY.",
    )
    add_label_studio_arguments(parser)
    parser.add_argument("--title", required=True, help="project title (an existing project with it is updated)")
    parser.add_argument(
        "--label-config", type=Path, default=DEFAULT_LABEL_CONFIG, help="label config XML file (default: %(default)s)"
    )
    parser.add_argument("--source", metavar="gs://BUCKET/PREFIX", help="images: connected as import storage")
    parser.add_argument(
        "--target", metavar="gs://BUCKET/PREFIX", help="annotations: connected as export storage (written on submit)"
    )
    parser.add_argument(
        "--presign",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="browsers read images through presigned URLs (needs a service-account key in "
        "Label Studio) instead of through Label Studio (default: --no-presign)",
    )
    parser.add_argument(
        "--presign-ttl", type=int, default=15, metavar="MINUTES", help="presigned URL lifetime (default 15)"
    )
    parser.add_argument(
        "--regex-filter", default=IMAGE_REGEX, help="which source objects are images (default: %(default)s)"
    )
    parser.add_argument(
        "--allow-sync",
        action="store_true",
        help="let Label Studio's 'Sync' create tasks from the source bucket (without metadata); "
        "off by default so tasks come only from import_gcs",
    )
    parser.add_argument(
        "--gcs-credentials",
        type=Path,
        default=None,
        metavar="KEY.json",
        help="service-account key that Label Studio stores and uses for both buckets "
        "(default: Label Studio's own environment)",
    )
    parser.add_argument("--google-project-id", default="", help="Google Cloud project of the buckets")
    parser.add_argument(
        "--seg-url",
        default="http://localhost:7070",
        help="segmentation backend URL as Label Studio reaches it (default %(default)s; '' to skip)",
    )
    parser.add_argument(
        "--sam-url",
        default="http://localhost:9090",
        help="SAM backend URL as Label Studio reaches it (default %(default)s; '' to skip)",
    )
    parser.add_argument("--skip-backends", action="store_true", help="do not connect ML backends")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def options_from_args(args: argparse.Namespace, settings: CliSettings) -> SetupOptions:
    if not args.title.strip():
        raise UserError("--title must not be empty")
    try:
        label_config = args.label_config.read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot read label config {args.label_config}: {error.strerror}") from None
    credentials = ""
    if args.gcs_credentials is not None:
        try:
            credentials = args.gcs_credentials.read_text(encoding="utf-8")
        except OSError as error:
            raise UserError(f"cannot read GCS key file {args.gcs_credentials}: {error.strerror}") from None
    backends: list[BackendSpec] = []
    if not args.skip_backends:
        if args.seg_url.strip():
            backends.append(BackendSpec(args.seg_url.strip().rstrip("/"), SEG_TITLE, False))
        if args.sam_url.strip():
            backends.append(BackendSpec(args.sam_url.strip().rstrip("/"), SAM_TITLE, True))
    if args.presign_ttl < 1:
        raise UserError("--presign-ttl must be at least 1 minute")
    try:
        re.compile(args.regex_filter)
    except re.error as error:
        raise UserError(f"--regex-filter is not a regular expression: {error}") from None
    return SetupOptions(
        title=args.title.strip(),
        label_config=label_config,
        source=parse_gs_uri(args.source) if args.source else None,
        target=parse_gs_uri(args.target) if args.target else None,
        presign=args.presign,
        presign_ttl_minutes=args.presign_ttl,
        regex_filter=args.regex_filter,
        allow_sync=args.allow_sync,
        storage_credentials=credentials,
        google_project_id=args.google_project_id.strip(),
        backends=tuple(backends),
        basic_auth_user=settings.basic_auth_user,
        basic_auth_pass=settings.basic_auth_pass,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        settings = configured_settings()
        options = options_from_args(args, settings)
        for warning in label_config_warnings(options.label_config):
            print(f"warning: {warning}", file=sys.stderr)
        conn = connect_label_studio(settings, args.url)
        changes = setup_project(conn, options, progress=not args.no_progress)
        for change in changes:
            print(f"{change.kind:15} {change.id:>5}  {change.action:9}  {change.detail}")
        project_id = changes[0].id
        print(f"project {project_id}: {conn.project_url(project_id)}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
