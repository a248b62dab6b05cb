"""Real backend processes for the reliability suite: `python -m sam` / `python -m segmentation` on a
free loopback port (devstack's spawn and wait), with an environment cleaned of backend and Label
Studio settings, stdout and stderr captured in a file (scanned for secrets by test_security.py).
Nothing leaves the machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Self

import requests

from devstack.processes import (
    ManagedProcess,
    StartupError,
    child_env,
    free_port,
    spawn,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
_SETTING_PREFIXES = ("LABEL_STUDIO_", "BASIC_AUTH_", "SAM_", "SEG_", "IMAGE_", "GOOGLE_", "GCS_", "STORAGE_EMULATOR")
_SETTING_NAMES = {
    "MODEL_DIR",
    "DEVICE",
    "LOG_LEVEL",
    "MAX_REQUEST_MB",
    "EMBEDDING_CACHE_MB",
    "TRAIN_EVERY",
    "TRAIN_MINUTES",
    "VAL_FRACTION",
    "HOST",
    "PORT",
    "USERNAME",
    "PASSWORD",
}


def clean_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The test process's environment without any backend or Label Studio settings, plus `extra`;
    proxies point nowhere so no library reaches outside the machine."""
    settings = [name for name in os.environ if name.startswith(_SETTING_PREFIXES) or name in _SETTING_NAMES]
    base = {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return child_env({**base, **extra}, drop=settings)


class BackendProcess:
    """`python -m <module> --host 127.0.0.1 --port <free>` with `env`; output goes to `log_path`.
    Ready once /health answers (401 counts: with basic auth, `auth` may be wrong on purpose)."""

    def __init__(self, module: str, env: Mapping[str, str], log_path: Path, auth: tuple[str, str] | None = None):
        self.module = module
        self.env = clean_environment(env)
        self.log_path = Path(log_path)
        self.auth = auth
        self.port = 0
        self.managed: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def process(self) -> subprocess.Popen | None:
        return self.managed.popen if self.managed else None

    def start(self, timeout_s: float = 90.0) -> Self:
        for _ in range(3):  # a free port can be taken between the probe and the bind: try another
            self.port = free_port()
            argv = [sys.executable, "-m", self.module, "--host", "127.0.0.1", "--port", str(self.port)]
            self.managed = spawn(self.module, argv, self.env, self.log_path)
            try:
                wait_until(self.managed, self._answers, timeout_s, "answering /health")
                return self
            except StartupError:
                continue
        raise RuntimeError(f"{self.module} did not start; log tail:\n{self.log()[-3000:]}")

    def _answers(self) -> bool:
        return requests.get(f"{self.url}/health", auth=self.auth, timeout=1.0).status_code in (200, 401)

    def stop(self) -> None:
        if self.managed is not None:
            self.managed.stop(timeout=15)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
