"""What the SDK scripts share: settings from the environment, clients, URIs, errors and file names.

The scripts are command-line entry points, so (unlike the backends) they read the environment,
once, here, into `CliSettings`:

- ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``: Label Studio and an API key (a legacy token or a
  personal access token; label-studio-sdk 2.x handles both).
- ``GOOGLE_APPLICATION_CREDENTIALS``: a service-account key file (``--gcs-credentials`` wins);
  without one, Application Default Credentials.
- ``STORAGE_EMULATOR_HOST``: a GCS emulator (fake-gcs-server); anonymous credentials, project "test".
- ``BASIC_AUTH_USER``, ``BASIC_AUTH_PASS``: the ML backends' basic auth, handed to Label Studio when
  setup_project connects them.
- ``LOG_LEVEL``.
- ``POLYGON_MAX_VERTICES``: vertices allowed per annotated polygon that export_masks rasterises
  (default 10000, as in the backends); a polygon with more is reported and left out of its mask.

User errors (bad token, missing bucket, Label Studio unreachable, bad arguments) raise `UserError`;
`run_main` turns them into one line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from backends.label_studio.auth import strip_key_scheme

if TYPE_CHECKING:  # imported where used: the SDK is slow to import
    from label_studio_sdk import LabelStudio

log = logging.getLogger("sdk_scripts")

EXIT_USER_ERROR = 2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
DEFAULT_LABEL_CONFIG = Path(__file__).resolve().parent.parent / "label_config.xml"

T = TypeVar("T")


class UserError(Exception):
    """Something the user can fix (arguments, credentials, buckets, a service that is down)."""


@dataclass(frozen=True)
class CliSettings:
    """The environment the scripts run in, read once by `from_env`."""

    label_studio_url: str = ""
    label_studio_api_key: str = field(default="", repr=False)
    google_application_credentials: str = ""
    storage_emulator_host: str = ""
    basic_auth_user: str = ""
    basic_auth_pass: str = field(default="", repr=False)
    log_level: str = "INFO"
    polygon_max_vertices: int = 10_000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CliSettings:
        env = os.environ if environ is None else environ
        return cls(
            label_studio_url=env.get("LABEL_STUDIO_URL", "").strip().rstrip("/"),
            label_studio_api_key=strip_key_scheme(env.get("LABEL_STUDIO_API_KEY", "")),
            google_application_credentials=env.get("GOOGLE_APPLICATION_CREDENTIALS", "").strip(),
            storage_emulator_host=env.get("STORAGE_EMULATOR_HOST", "").strip(),
            basic_auth_user=env.get("BASIC_AUTH_USER", "").strip(),
            basic_auth_pass=env.get("BASIC_AUTH_PASS", ""),
            log_level=env.get("LOG_LEVEL", "INFO").strip().upper() or "INFO",
            polygon_max_vertices=_polygon_max_vertices(env.get("POLYGON_MAX_VERTICES", "")),
        )


def _polygon_max_vertices(raw: str) -> int:
    try:
        value = int(raw.strip() or "10000")
    except ValueError:
        raise UserError(f"POLYGON_MAX_VERTICES={raw!r} is not a whole number") from None
    if value < 3:
        raise UserError(f"POLYGON_MAX_VERTICES={value} must be at least 3")
    return value


# --------------------------------------------------------------------- running a script
# Task data keys Label Studio's frontend resolves to something else: a label config's `$source`
# shows the whole serialised task (predictions, drafts and mask data included), not the metadata.
RESERVED_TASK_KEYS = {"source": "Label Studio's frontend resolves $source to the whole serialised task"}


def reserved_key_warnings(keys: Iterable[str]) -> list[str]:
    """One warning per metadata key among `keys` that the frontend reserves."""
    return [
        f"metadata key {key!r} is reserved ({RESERVED_TASK_KEYS[key]}): rename it, e.g. to 'dataset'"
        for key in sorted(set(keys) & RESERVED_TASK_KEYS.keys())
    ]


def label_config_warnings(xml: str) -> list[str]:
    """Warnings for label-config variables the frontend reserves ($source)."""
    return [
        f"the label config shows ${key}, which is reserved ({why}): use another metadata key, e.g. $dataset"
        for key, why in RESERVED_TASK_KEYS.items()
        if re.search(rf"\${key}\b", xml)
    ]


def configure_logging(level: str) -> None:
    """The backends' redacting logging set-up (no tokens in logs)."""
    from backends.logs import configure_logging as configure

    configure(level)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the report


def configured_settings() -> CliSettings:
    """The environment's settings, with logging set up from them (UserError for a bad value)."""
    settings = CliSettings.from_env()
    configure_logging(settings.log_level)
    return settings


def run_main(body: Callable[[], int]) -> int:
    """Run a script body: `UserError` -> "error: ..." on stderr and exit status 2; Ctrl-C -> 130."""
    try:
        return body()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def add_label_studio_arguments(parser) -> None:
    parser.add_argument("--url", default=None, help="Label Studio URL (default: $LABEL_STUDIO_URL)")


def add_gcs_arguments(parser) -> None:
    parser.add_argument(
        "--gcs-credentials",
        default=None,
        metavar="KEY.json",
        help="service-account key file for GCS (default: $GOOGLE_APPLICATION_CREDENTIALS, "
        "else Application Default Credentials; $STORAGE_EMULATOR_HOST selects an emulator)",
    )


# --------------------------------------------------------------------- Label Studio
@dataclass(frozen=True)
class LabelStudioConnection:
    """A checked SDK client (`ls`: label_studio_sdk.LabelStudio) and the URL it talks to."""

    ls: LabelStudio
    url: str
    api_key: str = field(default="", repr=False)

    def call(self, func: Callable[..., T], *args, what: str, **kwargs) -> T:
        return call_label_studio(func, *args, what=what, base_url=self.url, **kwargs)

    def project_url(self, project_id: int) -> str:
        return f"{self.url}/projects/{project_id}/data"


def connect_label_studio(settings: CliSettings, url: str | None = None) -> LabelStudioConnection:
    """Connect and check that the URL answers and the API key is accepted."""
    from label_studio_sdk import LabelStudio

    base_url = (url or settings.label_studio_url).strip().rstrip("/")
    if not base_url:
        raise UserError("no Label Studio URL: set LABEL_STUDIO_URL (or pass --url)")
    if not base_url.startswith(("http://", "https://")):
        raise UserError(f"Label Studio URL must start with http:// or https://, got {base_url!r}")
    if not settings.label_studio_api_key:
        raise UserError(
            "no API key: set LABEL_STUDIO_API_KEY (a legacy token or a personal access token "
            "from Label Studio's Account & Settings page)"
        )
    ls = LabelStudio(base_url=base_url, api_key=settings.label_studio_api_key, timeout=60)
    connection = LabelStudioConnection(ls=ls, url=base_url, api_key=settings.label_studio_api_key)
    connection.call(ls.users.whoami, what="check the API key")
    return connection


def call_label_studio(func: Callable[..., T], *args, what: str, base_url: str = "", **kwargs) -> T:
    """Call an SDK method, turning connection failures and HTTP errors into one-line `UserError`s."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        return func(*args, **kwargs)
    except ApiError as error:
        raise UserError(describe_api_error(error, what)) from None
    except httpx.TimeoutException:
        raise UserError(f"Label Studio {base_url} did not answer in time (while trying to {what})") from None
    except httpx.TransportError as error:
        raise UserError(
            f"cannot reach Label Studio {base_url} ({type(error).__name__}) while trying to {what}: is it running?"
        ) from None


def describe_api_error(error, what: str) -> str:
    """One line for an SDK `ApiError`: what failed, the status and Label Studio's own message."""
    status = getattr(error, "status_code", None)
    if status == 401:
        return (
            f"Label Studio rejected the API key (HTTP 401) while trying to {what}: "
            "check LABEL_STUDIO_API_KEY (legacy token or personal access token)"
        )
    if status == 403:
        return f"the API key's user may not {what} (HTTP 403)"
    if status == 404:
        return f"not found (HTTP 404) while trying to {what}"
    return f"Label Studio answered HTTP {status} while trying to {what}: {api_error_detail(error.body)}"


def api_error_detail(body) -> str:
    """Label Studio's error body, flattened to one short line (validation errors included)."""
    if isinstance(body, dict):
        detail = body.get("validation_errors") or body.get("detail") or body.get("message") or body
        if isinstance(detail, dict):
            detail = "; ".join(f"{key}: {_flatten(value)}" for key, value in detail.items())
        text = _flatten(detail)
    else:
        text = _flatten(body)
    text = " ".join(re.sub(r"<[^>]+>", "", text).split())  # Label Studio puts HTML links in some messages
    return text if len(text) <= 400 else text[:397] + "..."


def _flatten(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_flatten(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)


def list_projects(conn: LabelStudioConnection) -> list:
    pager: Iterable[Any] = conn.call(conn.ls.projects.list, page_size=100, what="list projects")
    return conn.call(list, pager, what="list projects")


def find_project(conn: LabelStudioConnection, project: str) -> int:
    """A project id from `project`: a number is an id, anything else an exact title (one match)."""
    if project.strip().isdigit():
        found = conn.call(conn.ls.projects.get, id=int(project), what=f"read project {project}")
        return project_id_of(found)
    matches = [p for p in list_projects(conn) if (p.title or "") == project]
    if not matches:
        raise UserError(f"no project titled {project!r} in Label Studio {conn.url}")
    if len(matches) > 1:
        ids = ", ".join(str(p.id) for p in matches)
        raise UserError(f"{len(matches)} projects are titled {project!r} (ids {ids}): pass the id instead")
    return int(matches[0].id)


def project_id_of(project: Any) -> int:
    """An SDK project object's id (typed Optional by the SDK; Label Studio always sends it)."""
    if project.id is None:
        raise UserError("Label Studio answered with a project that has no id")
    return int(project.id)


def iter_tasks(conn: LabelStudioConnection, project_id: int, fields: str = "all") -> Iterator[dict]:
    """Every task of a project as a plain dict (id, data, ...), page by page, with storage URIs as
    stored (``gs://...``), not rewritten to Label Studio's resolve links."""
    what = f"list the tasks of project {project_id}"
    pager: Iterable[Any] = conn.call(
        conn.ls.tasks.list, project=project_id, fields=fields, page_size=500, resolve_uri=False, what=what
    )
    iterator = iter(pager)
    while True:
        task = conn.call(next, iterator, None, what=what)
        if task is None:
            return
        yield task.model_dump() if hasattr(task, "model_dump") else dict(task)


def original_uri(value: str) -> str:
    """The storage URI behind a Label Studio resolve link (``/tasks/7/resolve/?fileuri=<urlsafe b64>``,
    possibly absolute); any other value unchanged."""
    import base64
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(value or "")
    if not re.search(r"/resolve/?$", parts.path):
        return value
    fileuri = parse_qs(parts.query).get("fileuri", [""])[0]
    try:
        return base64.urlsafe_b64decode(fileuri + "=" * (-len(fileuri) % 4)).decode("utf-8") or value
    except (ValueError, UnicodeDecodeError):
        return value


# --------------------------------------------------------------------- GCS
def parse_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/some/prefix/`` -> ("bucket", "some/prefix") (no leading/trailing slash)."""
    match = re.fullmatch(r"gs://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])(?:/(.*))?", uri.strip())
    if not match:
        raise UserError(f"not a GCS location: {uri!r} (expected gs://BUCKET or gs://BUCKET/PREFIX)")
    return match.group(1), (match.group(2) or "").strip("/")


def gs_uri(bucket: str, name: str) -> str:
    return f"gs://{bucket}/{name}"


def gcs_client(settings: CliSettings, credentials_file: str | None = None):
    """A google-cloud-storage client: the emulator (anonymous, project "test") when
    STORAGE_EMULATOR_HOST is set, else a service-account key file, else Application Default Credentials."""
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    key_file = credentials_file or settings.google_application_credentials
    if settings.storage_emulator_host:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(
            project="test",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": settings.storage_emulator_host},
        )
    if key_file:
        if not Path(key_file).is_file():
            raise UserError(f"GCS key file {key_file} does not exist")
        try:
            return storage.Client.from_service_account_json(key_file)
        except (ValueError, KeyError, json.JSONDecodeError) as error:
            raise UserError(f"GCS key file {key_file} is not a service-account key: {error}") from None
    try:
        return storage.Client()
    except DefaultCredentialsError:
        raise UserError(
            "no Google credentials: run `gcloud auth application-default login`, pass --gcs-credentials KEY.json "
            "or set GOOGLE_APPLICATION_CREDENTIALS (or STORAGE_EMULATOR_HOST for an emulator)"
        ) from None


def call_gcs(func: Callable[..., T], *args, what: str, **kwargs) -> T:
    """Call google-cloud-storage, turning its failures into one-line `UserError`s."""
    import requests
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import GoogleAuthError

    try:
        return func(*args, **kwargs)
    except gexc.NotFound:
        raise UserError(f"GCS: not found while trying to {what}") from None
    except (gexc.Forbidden, gexc.Unauthorized) as error:
        raise UserError(f"GCS refused access while trying to {what}: {error.message}") from None
    except gexc.RetryError as error:
        raise UserError(f"GCS could not be reached while trying to {what} ({_short(error.cause)})") from None
    except gexc.GoogleAPICallError as error:
        raise UserError(f"GCS error while trying to {what}: {error.message}") from None
    except GoogleAuthError as error:
        raise UserError(f"GCS credentials failed while trying to {what}: {_short(error)}") from None
    except requests.RequestException as error:
        raise UserError(f"GCS could not be reached while trying to {what} ({type(error).__name__})") from None


def _short(error) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


def gcs_retry(deadline_s: float = 20.0):
    """A retry policy that gives up after `deadline_s` (the library's default waits 120 s)."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return (
        DEFAULT_RETRY.with_timeout(deadline_s)
        if hasattr(DEFAULT_RETRY, "with_timeout")
        else DEFAULT_RETRY.with_deadline(deadline_s)
    )


def require_bucket(client, bucket: str) -> None:
    """Raise `UserError` unless `bucket` exists and is readable."""
    exists = call_gcs(client.bucket(bucket).exists, retry=gcs_retry(), timeout=15, what=f"check bucket gs://{bucket}")
    if not exists:
        raise UserError(f"GCS bucket gs://{bucket} does not exist (or the credentials cannot see it)")


def list_objects(client, bucket: str, prefix: str) -> list[str]:
    """Object names under `prefix` (a folder: "a/b" lists "a/b/..."), sorted."""
    folder = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    blobs = call_gcs(
        client.list_blobs,
        bucket,
        prefix=folder or None,
        retry=gcs_retry(),
        timeout=30,
        what=f"list gs://{bucket}/{folder}",
    )
    return sorted(call_gcs(lambda: [blob.name for blob in blobs], what=f"list gs://{bucket}/{folder}"))


def read_object(client, bucket: str, name: str) -> bytes:
    return call_gcs(
        client.bucket(bucket).blob(name).download_as_bytes,
        retry=gcs_retry(),
        timeout=60,
        what=f"read gs://{bucket}/{name}",
    )


# --------------------------------------------------------------------- names and files
def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def safe_stem(name: str, max_length: int = 120) -> str:
    """A file stem that is safe on every file system: the last path component of `name` (an object
    name, URL or label) without its extension; only ASCII letters, digits, ``-``, ``_`` and ``.`` kept
    (others become ``_``); no leading dots; never empty, never ``.``/``..``.

    >>> safe_stem("gs://bucket/a/../../etc/passwd.png")
    'passwd'
    """
    text = str(name).split("?", 1)[0]
    last = re.split(r"[\\/]", text.rstrip("/\\"))[-1]
    stem, dot, suffix = last.rpartition(".")
    if dot and stem and 1 <= len(suffix) <= 5 and suffix.isalnum():
        last = stem
    # ASCII only: accents are dropped ("ü" -> "u"), other characters become "_".
    last = unicodedata.normalize("NFKD", last).encode("ascii", "ignore").decode("ascii")
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", last).strip("._") or "item"
    return cleaned[:max_length]


def unique_stems(names: Sequence[str], keys: Sequence[object]) -> list[str]:
    """`safe_stem` of each name, made unique by appending ``-<key>`` where two collide
    (case-insensitively: macOS and Windows file systems fold case)."""
    stems = [safe_stem(name) for name in names]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem.lower()] = counts.get(stem.lower(), 0) + 1
    result: list[str] = []
    taken: set[str] = set()
    for stem, key in zip(stems, keys, strict=True):
        candidate = stem if counts[stem.lower()] == 1 else f"{stem}-{safe_stem(str(key))}"
        while candidate.lower() in taken:
            candidate += "_"
        taken.add(candidate.lower())
        result.append(candidate)
    return result


def batched(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]
