"""Real processes on loopback, shared by every suite that needs the real stack (tests/e2e,
tests/browser, tests/scale...): registered in tests/conftest.py so one pytest session starts one
Label Studio and one GCS emulator however many suites use them.

Session fixtures:
- `gcs_emulator`: a fake-gcs-server (`.url`, `.storage` google-cloud-storage client,
  `devstack.gcs.upload_objects(...)` to fill buckets).
- `label_studio`: a Label Studio 1.23 server wired to that emulator (`.url`, `.token` legacy,
  `.username`, `.password`, `.ls` SDK client, `.http` authenticated requests session,
  `.upload_files(project_id, paths) -> task ids`).
- `redis_server`: a real redis-server (`.url` for REDIS_URL, `.stop()`/`.start()`).
- `start_backend(name, env=None, **kwargs)`: starts `python -m sam|segmentation` pointed at that
  Label Studio -> `devstack.backends.Backend` (`.url`, `.log_path`, `.health()`, `.stop()`).
Everything started here is stopped at the end of the session, also after failures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devstack.backends import Backend
from devstack.backends import start_backend as _start_backend
from devstack.gcs import GcsEmulator, start_fake_gcs
from devstack.label_studio import LS_BIN, LabelStudioServer, label_studio_installed, start_label_studio
from devstack.redis_server import RedisServer, redis_server_binary, start_redis
from tests.support.ci import unavailable


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data and logs of this session's processes (logs under `logs/`)."""
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def gcs_emulator(stack_dir: Path) -> Iterator[GcsEmulator]:
    emulator = start_fake_gcs(stack_dir / "gcs", stack_dir / "logs" / "fake-gcs-server.log")
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="session")
def label_studio_installed_or_skip() -> None:
    """Skips where .venv-ls is missing, except in CI (CI=true), where that is a failure."""
    if not label_studio_installed():
        unavailable(f"Label Studio is not installed at {LS_BIN} (run `make install-label-studio`)")


@pytest.fixture(scope="session")
def label_studio(
    stack_dir: Path, gcs_emulator: GcsEmulator, label_studio_installed_or_skip: None
) -> Iterator[LabelStudioServer]:
    server = start_label_studio(
        stack_dir / "label-studio",
        stack_dir / "logs" / "label-studio.log",
        gcs_url=gcs_emulator.url,
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def start_backend(stack_dir: Path, label_studio: LabelStudioServer) -> Iterator[Callable[..., Backend]]:
    """Factory: `start_backend("sam", env={"SAM_ENGINE": "classic"})`. Defaults point the backend
    at the session's Label Studio with its legacy token, give it its own MODEL_DIR and image
    cache, and SAM_ENGINE=classic (no checkpoint here); `env` overrides them."""
    started: list[Backend] = []

    def start(name: str, env: dict[str, str] | None = None, **kwargs) -> Backend:
        index = len(started)
        home = stack_dir / f"{name}-{index}"
        defaults = {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.token,
            "MODEL_DIR": str(home / "models"),
            "IMAGE_CACHE_DIR": str(home / "image-cache"),
            "LOG_LEVEL": "INFO",
        }
        if name == "sam":
            defaults["SAM_ENGINE"] = "classic"
        backend = _start_backend(
            name, {**defaults, **(env or {})}, stack_dir / "logs" / f"{name}-{index}.log", **kwargs
        )
        started.append(backend)
        return backend

    try:
        yield start
    finally:
        for backend in reversed(started):
            backend.stop()


@pytest.fixture(scope="session")
def redis_server(stack_dir: Path) -> Iterator[RedisServer]:
    """A real redis-server on loopback (`.url` for REDIS_URL; `.stop()`/`.start()` to take it down and
    back on the same port). Skips where redis-server is missing, except in CI, where that fails."""
    if redis_server_binary() is None:
        unavailable("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    server = start_redis(stack_dir / "redis", stack_dir / "logs" / "redis.log")
    try:
        yield server
    finally:
        server.stop()
