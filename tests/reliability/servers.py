"""Loopback servers and real backend processes for the reliability suite.

- `ImageHost`: a loopback HTTP server with a corpus of images, hostile files and redirects;
- `fuzz_label_studio()`: tests.unit.fake_http.FakeLabelStudio made robust to any path a fuzzer
  invents (it answers 404, never drops the connection), with its /health up;
- `BackendProcess`: `python -m sam` / `python -m segmentation` on a free loopback port, its
  stdout and stderr captured in a file (scanned for secrets by test_security.py).
Nothing listens on a fixed port and nothing leaves the machine.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

import requests

from tests.unit.fake_http import FakeLabelStudio, LoopbackServer, RecordedRequest, Reply

REPO_ROOT = Path(__file__).resolve().parents[2]


class ImageHost:
    """Serves `files` (path -> Reply, or bytes for a 200 image/png); 404 elsewhere; records requests."""

    def __init__(self, files: Mapping[str, Reply | bytes] | None = None):
        self.files: dict[str, Reply] = {}
        self.server = LoopbackServer(self._handle)
        for path, reply in (files or {}).items():
            self.add(path, reply)

    def add(self, path: str, reply: Reply | bytes) -> str:
        """Serve `reply` at `path`; returns the full URL."""
        if isinstance(reply, bytes):
            reply = Reply(200, reply, {"Content-Type": "image/png"})
        self.files[path] = reply
        return self.url + path  # the port is bound at construction

    def _handle(self, request: RecordedRequest) -> Reply:
        return self.files.get(request.path, Reply(404, b"<html><body>Not found</body></html>",
                                                  {"Content-Type": "text/html"}))

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def hits(self, path: str) -> int:
        return sum(1 for request in self.server.requests if request.path == path)

    def __enter__(self) -> "ImageHost":
        self.server.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.server.__exit__(*exc)


def fuzz_label_studio() -> FakeLabelStudio:
    """A FakeLabelStudio whose handler answers 404 (never a dropped connection) to paths it cannot
    parse: a fuzzer's relative image paths land there, and must give a 4xx, not a 503."""
    fake = FakeLabelStudio()
    handle = fake.handle

    def robust(request: RecordedRequest) -> Reply:
        try:
            return handle(request)
        except Exception:
            return Reply(404, b'{"detail": "Not found."}', {"Content-Type": "application/json"})

    fake.server.app = robust
    return fake


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The test process's environment without any backend or Label Studio settings, plus `extra`;
    proxies point nowhere so no library reaches outside the machine."""
    prefixes = ("LABEL_STUDIO_", "BASIC_AUTH_", "SAM_", "SEG_", "IMAGE_", "GOOGLE_", "GCS_", "STORAGE_EMULATOR")
    names = {"MODEL_DIR", "DEVICE", "LOG_LEVEL", "MAX_REQUEST_MB", "EMBEDDING_CACHE_MB", "TRAIN_EVERY",
             "TRAIN_MINUTES", "VAL_FRACTION", "HOST", "PORT", "USERNAME", "PASSWORD"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k not in names}
    env.update({
        "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
    })
    env.update(extra)
    return env


class BackendProcess:
    """`python -m <module> --host 127.0.0.1 --port <free>` with `env`; output goes to `log_path`."""

    def __init__(self, module: str, env: Mapping[str, str], log_path: Path, auth: tuple[str, str] | None = None):
        self.module = module
        self.env = clean_environment(env)
        self.log_path = Path(log_path)
        self.auth = auth
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> "BackendProcess":
        for _ in range(3):  # a free port can be taken between the probe and the bind: try another
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", self.module, "--host", "127.0.0.1", "--port", str(self.port)],
                    cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )
            if self._wait_ready(timeout_s):
                return self
        raise RuntimeError(f"{self.module} did not start; log tail:\n{self.log()[-3000:]}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                response = requests.get(f"{self.url}/health", auth=self.auth, timeout=1.0)
                if response.status_code in (200, 401):
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "BackendProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
