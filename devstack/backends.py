"""The two ML backends (`python -m sam`, `python -m segmentation`) as local processes."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import requests

from devstack.processes import (
    ManagedProcess,
    child_env,
    free_port,
    http_ok,
    spawn,
    wait_until,
)

BACKEND_MODULES = {"sam": "sam", "segmentation": "segmentation"}
DEFAULT_PORTS = {"sam": 9090, "segmentation": 7070}


@dataclass
class Backend:
    name: str
    url: str
    port: int
    process: ManagedProcess

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def health(self) -> dict:
        with requests.Session() as session:
            session.trust_env = False
            return session.get(f"{self.url}/health", timeout=5).json()

    def stop(self) -> None:
        self.process.stop()


def start_backend(
    name: str,
    env: Mapping[str, str],
    log_path: Path,
    *,
    port: int | None = None,
    python: str = sys.executable,
    timeout: float = 120.0,
) -> Backend:
    """Start backend `name` ("sam" or "segmentation") on 127.0.0.1 with `env` added to ours
    (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, MODEL_DIR, SAM_ENGINE, ...); returns once
    `GET /health` answers 200, or raises StartupError with the log tail."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(BACKEND_MODULES)}")
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [python, "-m", BACKEND_MODULES[name], "--host", "127.0.0.1", "--port", str(port)]
    process = spawn(name, argv, child_env({"PYTHONUNBUFFERED": "1", **env}), log_path)
    wait_until(process, lambda: http_ok(f"{url}/health"), timeout, "healthy")
    return Backend(name=name, url=url, port=port, process=process)
