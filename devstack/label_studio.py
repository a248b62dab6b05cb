"""A real Label Studio server on loopback, started from its own virtual environment (.venv-ls).

The first start on an empty database migrates for ~25 s. So a migrated data directory (with its
admin user and legacy token) is kept once per Label Studio version under run/ls-template/ and
copied for every new instance, which then starts in a few seconds.
"""

from __future__ import annotations

import fcntl
import json
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import requests

from devstack.processes import (
    REPO_ROOT,
    RUN_DIR,
    ManagedProcess,
    StartupError,
    child_env,
    free_port,
    http_ok,
    spawn,
    wait_until,
)

LS_VERSION = "1.23.2"  # what `make install-label-studio` installs
LS_VENV = REPO_ROOT / ".venv-ls"
LS_BIN = LS_VENV / "bin" / "label-studio"
TEMPLATE_ROOT = RUN_DIR / "ls-template"
CREDENTIALS_FILE = "devstack-credentials.json"

_SERVER_LINE = re.compile(r"Starting development server at https?://[^:/\s]+:(\d+)")
# Read by Label Studio as settings when present (HOST, PORT, USERNAME, PASSWORD, and the same
# names with LABEL_STUDIO_/HEARTEX_ prefixes): never inherit them.
_STRAY = ("USERNAME", "PASSWORD", "HOST", "PORT")
_DROP = tuple(prefix + name for prefix in ("", "LABEL_STUDIO_", "HEARTEX_") for name in _STRAY)


@dataclass(frozen=True)
class Credentials:
    """The admin account of an instance; `token` is its legacy API token (`Authorization: Token`)."""

    username: str
    password: str
    token: str

    @classmethod
    def generate(cls) -> Credentials:
        return cls("admin@example.com", secrets.token_urlsafe(12), secrets.token_hex(20))

    @classmethod
    def load(cls, data_dir: Path) -> Credentials:
        return cls(**json.loads((Path(data_dir) / CREDENTIALS_FILE).read_text()))

    def save(self, data_dir: Path) -> None:
        path = Path(data_dir) / CREDENTIALS_FILE
        path.write_text(json.dumps(self.__dict__))
        path.chmod(0o600)


@dataclass
class LabelStudioServer:
    url: str
    port: int
    data_dir: Path
    credentials: Credentials
    process: ManagedProcess

    @property
    def token(self) -> str:
        return self.credentials.token

    @property
    def username(self) -> str:
        return self.credentials.username

    @property
    def password(self) -> str:
        return self.credentials.password

    @property
    def log_path(self) -> Path | None:
        return self.process.log_path if self.process else None

    def session(self) -> requests.Session:
        """A requests session with the legacy token, ignoring proxy variables."""
        session = requests.Session()
        session.trust_env = False
        session.headers["Authorization"] = f"Token {self.token}"
        return session

    def client(self):
        """A label-studio-sdk 2.x client for this server."""
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=self.token)

    @cached_property
    def ls(self):
        """One shared SDK client (`client()` makes a new one)."""
        return self.client()

    @cached_property
    def http(self) -> requests.Session:
        """One shared authenticated requests session (`session()` makes a new one)."""
        return self.session()

    def upload_files(self, project_id: int, paths: list[Path]) -> list[int]:
        """Upload image files into a project (`POST /api/projects/{id}/import`, multipart),
        one task per file; returns the new task ids in the order of `paths`."""
        # Label Studio reads one file per form field name.
        files = [(f"file{index}", (Path(p).name, Path(p).read_bytes())) for index, p in enumerate(paths)]
        response = self.http.post(
            f"{self.url}/api/projects/{project_id}/import",
            params={"return_task_ids": "true"},
            files=files,
            timeout=60,
        )
        if response.status_code != 201:
            raise RuntimeError(
                f"import into project {project_id} failed: HTTP {response.status_code} {response.text[:300]}"
            )
        return list(response.json()["task_ids"])

    def stop(self) -> None:
        self.process.stop()


def label_studio_installed() -> bool:
    return LS_BIN.exists()


def installed_version() -> str:
    """The label-studio version in .venv-ls (LS_VERSION when its metadata cannot be found)."""
    for dist_info in sorted(LS_VENV.glob("lib/python*/site-packages/label_studio-*.dist-info")):
        return dist_info.name[len("label_studio-") : -len(".dist-info")]
    return LS_VERSION


def label_studio_env(
    data_dir: Path,
    url: str,
    credentials: Credentials,
    gcs_url: str | None = None,
    local_files_root: Path | None = None,
) -> dict[str, str]:
    """The environment Label Studio needs on loopback (see ../shared/notes/label-studio-facts.md)."""
    overrides = {
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_HOST": url,
        "LABEL_STUDIO_USERNAME": credentials.username,
        "LABEL_STUDIO_PASSWORD": credentials.password,
        "LABEL_STUDIO_USER_TOKEN": credentials.token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        # Backends on 127.0.0.1 are refused unless both are off.
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
    }
    if gcs_url:
        overrides["STORAGE_EMULATOR_HOST"] = gcs_url
        # The default proxied-read URL is hard-wired to Google's host and ignores the emulator.
        overrides["LABEL_STUDIO_RESOLVER_PROXY_GCS_DOWNLOAD_URL"] = (
            gcs_url + "/download/storage/v1/b/{bucket_name}/o/{blob_name}?alt=media"
        )
    if local_files_root is not None:
        overrides["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"] = "true"
        overrides["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] = str(local_files_root)
    return child_env(overrides, drop=_DROP)


def _launch(
    data_dir: Path,
    credentials: Credentials,
    log_path: Path,
    port: int,
    gcs_url: str | None,
    local_files_root: Path | None,
    timeout: float,
) -> LabelStudioServer:
    url = f"http://127.0.0.1:{port}"
    argv = [
        str(LS_BIN),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "-p",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-level",
        "INFO",
    ]
    env = label_studio_env(data_dir, url, credentials, gcs_url, local_files_root)
    log_start = log_path.stat().st_size if log_path.exists() else 0
    process = spawn("label-studio", argv, env, log_path)

    def listening_port() -> int | None:
        with open(log_path, "rb") as log:
            log.seek(log_start)
            match = _SERVER_LINE.search(log.read().decode(errors="replace"))
        return int(match.group(1)) if match else None

    wait_until(process, lambda: listening_port() is not None, timeout, "serving")
    actual = listening_port()
    if actual != port:
        # It moves to the next port silently when ours was taken; LABEL_STUDIO_HOST would be wrong.
        raise process.fail(f"moved from port {port} to {actual} (port taken)")
    wait_until(process, lambda: http_ok(f"{url}/health"), timeout, "healthy")
    server = LabelStudioServer(url=url, port=port, data_dir=data_dir, credentials=credentials, process=process)
    with server.session() as session:
        whoami = session.get(f"{url}/api/current-user/whoami", timeout=10)
    if whoami.status_code != 200:
        raise process.fail(f"refused the legacy token (HTTP {whoami.status_code})")
    return server


def start_label_studio(
    data_dir: Path,
    log_path: Path,
    *,
    port: int | None = None,
    gcs_url: str | None = None,
    local_files_root: Path | None = None,
    timeout: float = 120.0,
    attempts: int = 3,
) -> LabelStudioServer:
    """Start Label Studio on 127.0.0.1 with its data in `data_dir`.

    An empty or missing `data_dir` is first filled with a copy of the migrated template (created
    once per version, ~25 s); an existing one is reused with the credentials saved in it.
    `gcs_url` points its GCS storages at an emulator. Raises StartupError with the log tail.
    """
    if not label_studio_installed():
        raise StartupError(f"Label Studio is not installed at {LS_BIN}: run `make install-label-studio`")
    data_dir = Path(data_dir).resolve()
    log_path = Path(log_path).resolve()
    if not (data_dir / CREDENTIALS_FILE).exists():
        if data_dir.exists() and any(data_dir.iterdir()):
            raise StartupError(f"{data_dir} holds data but no {CREDENTIALS_FILE}; remove it or use another dir")
        template = ensure_template(timeout=max(timeout, 180.0))
        shutil.copytree(template, data_dir, dirs_exist_ok=True)
    credentials = Credentials.load(data_dir)
    for attempt in range(attempts):
        chosen = port or free_port()
        try:
            return _launch(data_dir, credentials, log_path, chosen, gcs_url, local_files_root, timeout)
        except StartupError as error:
            if port is not None or "moved from port" not in str(error) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def ensure_template(timeout: float = 180.0) -> Path:
    """The migrated data directory for the installed Label Studio version, created on first use.

    A file lock makes concurrent test sessions wait for one creator instead of racing.
    """
    TEMPLATE_ROOT.mkdir(parents=True, exist_ok=True)
    version = installed_version()
    template = TEMPLATE_ROOT / version
    with open(TEMPLATE_ROOT / f"{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (template / CREDENTIALS_FILE).exists():
            return template
        staging = Path(tempfile.mkdtemp(prefix=f"{version}.", dir=TEMPLATE_ROOT))
        try:
            credentials = Credentials.generate()
            started = time.monotonic()
            server = _launch(
                staging,
                credentials,
                TEMPLATE_ROOT / f"{version}.log",
                free_port(),
                None,
                None,
                timeout,
            )
            server.stop()
            credentials.save(staging)
            staging.rename(template)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        (TEMPLATE_ROOT / f"{version}.seconds").write_text(f"{time.monotonic() - started:.1f}\n")
        return template
