"""Start, watch and stop local server processes on loopback.

Every process runs in its own process group (so its children stop with it) and writes stdout and
stderr to one log file; startup errors quote the tail of that log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = REPO_ROOT / "run"

# Variables that would let a child reach beyond loopback (or that Label Studio misreads as settings).
_NO_EGRESS = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


class StartupError(RuntimeError):
    """A process exited or did not become ready in time; the message quotes its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; bind it soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def preferred_port(port: int, host: str = "127.0.0.1") -> int:
    """`port` when it is free, otherwise any free port (stable URLs for the demo, no clashes)."""
    return port if port_is_free(port, host) else free_port(host)


def child_env(overrides: Mapping[str, str] | None = None, *, drop: Sequence[str] = ()) -> dict[str, str]:
    """The environment for a child: ours, minus `drop`, with every proxy pointed at a dead port
    on loopback (nothing leaves the machine), then `overrides`."""
    env = {key: value for key, value in os.environ.items() if key not in set(drop)}
    env.update(_NO_EGRESS)
    env.update(overrides or {})
    return env


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def group_alive(pgid: int) -> bool:
    """Whether any process is left in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pid: int) -> None:
    """Collect `pid` if it is an exited child of ours (a zombie still counts as a group member)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_group(pgid: int, timeout: float = 10.0, popen: subprocess.Popen | None = None) -> None:
    """SIGTERM the group, wait up to `timeout` s, then SIGKILL what is left.

    `popen`, when we are the parent, is reaped so that it leaves no zombie.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None and popen.poll() is None:
            time.sleep(0.1)
            continue
        if popen is None:
            _reap(pgid)
        if not group_alive(pgid):
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=5)
    else:
        time.sleep(0.1)
        _reap(pgid)


@dataclass
class ManagedProcess:
    """A server process we started, in its own process group (pgid == pid)."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.returncode is not None and not group_alive(self.pid):
            return
        stop_group(self.pid, timeout=timeout, popen=self.popen)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def fail(self, reason: str) -> StartupError:
        """Stop the process and build the error to raise, quoting the log tail."""
        self.stop(timeout=5)
        return StartupError(f"{self.name} {reason} (log: {self.log_path}); last lines:\n{self.log_tail()}")


def spawn(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path = REPO_ROOT,
) -> ManagedProcess:
    """Start `argv` in a new session (own process group), stdout+stderr appended to `log_path`."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ManagedProcess(name=name, popen=popen, log_path=log_path)


def wait_until(
    process: ManagedProcess,
    ready: Callable[[], bool],
    timeout: float,
    what: str = "ready",
) -> None:
    """Poll `ready()` until it is true; stop the process and raise StartupError if it exits
    first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        if not process.alive():
            raise process.fail(f"exited with code {process.popen.returncode} before it was {what}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not ready yet (connection refused, bad status, ...)
            pass
        if time.monotonic() > deadline:
            raise process.fail(f"was not {what} after {timeout:.0f} s")
        time.sleep(0.2)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """GET `url` straight (no proxy) and report whether it answered 200."""
    with requests.Session() as session:
        session.trust_env = False
        return session.get(url, timeout=timeout).status_code == 200
