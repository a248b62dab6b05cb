"""A real redis-server (Debian's package) on loopback, for the scale-out tests and the demo.

No persistence, a byte cap with Redis's own LRU eviction (what production should configure too),
and a fixed port so that `stop()` then `start()` brings the same URL back (a Redis that restarts).
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from devstack.processes import ManagedProcess, child_env, free_port, spawn, wait_until

REDIS_SERVER = "redis-server"


def redis_server_binary() -> str | None:
    """Path of redis-server, or None where it is not installed (`apt-get install redis-server`)."""
    return shutil.which(REDIS_SERVER)


def redis_answers(port: int, timeout: float = 1.0) -> bool:
    """Whether a Redis on 127.0.0.1:`port` answers PING (raw protocol: no client library needed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


@dataclass
class RedisServer:
    """A redis-server we run; `url` is what REDIS_URL should be."""

    root: Path
    log_path: Path
    maxmemory_mb: int = 256
    port: int = field(default_factory=free_port)
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.root),
            "--save", "",
            "--appendonly", "no",
            "--maxmemory", f"{self.maxmemory_mb}mb",
            "--maxmemory-policy", "allkeys-lru",
            "--protected-mode", "yes",
        ]  # fmt: skip
        self.process = spawn("redis-server", argv, child_env(), self.log_path)
        wait_until(self.process, lambda: redis_answers(self.port), timeout, "answering PING")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


def start_redis(root: Path, log_path: Path, maxmemory_mb: int = 256) -> RedisServer:
    """Start a redis-server on a free loopback port, data (none persisted) under `root`."""
    return RedisServer(root=Path(root), log_path=Path(log_path), maxmemory_mb=maxmemory_mb).start()
