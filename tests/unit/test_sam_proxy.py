"""deploy/nginx/sam-proxy.conf, the scale profile's round-robin proxy, run by Debian's real nginx.

The file is tested as it is except for what only the compose network can provide, rewritten in a
copy: the upstream names `sam` / `sam-2` become loopback addresses (two recording HTTP servers stand
in for the replicas: the proxy is what is under test), `listen 9090` a free loopback port, and the
pid and temp paths a scratch folder.
"""

from __future__ import annotations

import http.server
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from devstack.processes import free_port
from tests.support.ci import unavailable

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF = REPO_ROOT / "deploy" / "nginx" / "sam-proxy.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_or_skip() -> str:
    if Path(NGINX).exists():
        return NGINX
    unavailable("no nginx here (apt-get install nginx)")


def loopback_copy(text: str, upstreams: dict[str, int], listen: int, scratch: Path) -> str:
    """The config with the compose-only parts pointed at loopback and `scratch` (see module doc)."""
    for name, port in upstreams.items():
        text, count = re.subn(rf"(?m)^(\s*server\s+){re.escape(name)}:9090\b", rf"\g<1>127.0.0.1:{port}", text)
        assert count == 1, f"upstream {name}:9090 not found once in {CONF.name}"
    text, count = re.subn(r"(?m)^(\s*)listen 9090;", rf"\g<1>listen 127.0.0.1:{listen};", text)
    assert count == 1
    assert text.count("/tmp/") == text.count("/tmp/sam-proxy") == 3  # pid, body and proxy temp paths
    text = text.replace("/tmp/sam-proxy", str(scratch / "sam-proxy"))
    return text


@dataclass
class Replica:
    """A stand-in SAM replica on loopback: answers 200 (or `status`), records what it was sent;
    with `drop`, reads the request and closes the connection unanswered (killed mid-click)."""

    name: str
    status: int = 200
    drop: bool = False
    requests: list[tuple[str, str, bytes, str]] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> int:
        replica = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                replica.requests.append((self.command, self.path, body, self.headers.get("Authorization", "")))
                if replica.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                payload = f'{{"replica": "{replica.name}"}}'.encode()
                self.send_response(replica.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.server.server_address[1]

    def kill(self) -> None:
        """Gone, as a killed container is: the port refuses connections."""
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Proxy:
    url: str
    replicas: dict[str, Replica]


@pytest.fixture
def scratch() -> Iterator[Path]:
    # Not pytest's tmp_path: nginx started as root runs its workers as `nobody`, who must reach
    # the body temp folder (pytest's folders are private to their owner).
    path = Path(tempfile.mkdtemp(prefix="sam-proxy-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def proxy(scratch: Path) -> Iterator[Proxy]:
    nginx = nginx_or_skip()
    replicas = {"sam": Replica("sam"), "sam-2": Replica("sam-2")}
    ports = {name: replica.start() for name, replica in replicas.items()}
    listen = free_port()
    conf = scratch / "nginx.conf"
    conf.write_text(loopback_copy(CONF.read_text(), ports, listen, scratch))
    process = subprocess.Popen(
        [nginx, "-e", "stderr", "-p", str(scratch), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_port(listen, process)
        yield Proxy(url=f"http://127.0.0.1:{listen}", replicas=replicas)
    finally:
        process.terminate()
        process.wait(timeout=10)
        for replica in replicas.values():
            if replica.server is not None and replica.server.socket.fileno() != -1:
                replica.kill()


def _wait_for_port(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited: {process.stderr.read().decode() if process.stderr else ''}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("nginx did not listen within 10 s")


def served_by(response: requests.Response) -> str:
    return response.json()["replica"]


# ---------------------------------------------------------------- tests
def test_nginx_accepts_the_config(scratch):
    nginx = nginx_or_skip()
    conf = scratch / "nginx.conf"
    conf.write_text(loopback_copy(CONF.read_text(), {"sam": 1, "sam-2": 2}, free_port(), scratch))
    result = subprocess.run(
        [nginx, "-e", "stderr", "-p", str(scratch), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_round_robin_over_both_replicas_with_the_request_intact(proxy):
    auth = "Basic bHM6cHc="  # basic auth on the backends passes through the proxy
    with requests.Session() as session:
        session.trust_env = False
        answers = [
            session.post(f"{proxy.url}/predict", data=b'{"tasks": []}', headers={"Authorization": auth}, timeout=10)
            for _ in range(6)
        ]
    assert [a.status_code for a in answers] == [200] * 6
    assert sorted(served_by(a) for a in answers) == ["sam"] * 3 + ["sam-2"] * 3
    for replica in proxy.replicas.values():
        assert {r[:4] for r in replica.requests} == {("POST", "/predict", b'{"tasks": []}', auth)}


def test_a_dead_replica_loses_no_click(proxy):
    proxy.replicas["sam-2"].kill()
    with requests.Session() as session:
        session.trust_env = False
        answers = [session.post(f"{proxy.url}/predict", data=b"{}", timeout=10) for _ in range(6)]
    # Refused connections are retried on the live replica (proxy_next_upstream error).
    assert [(a.status_code, served_by(a)) for a in answers] == [(200, "sam")] * 6


def test_a_replica_dying_mid_click_loses_no_click(proxy):
    proxy.replicas["sam-2"].drop = True
    with requests.Session() as session:
        session.trust_env = False
        answers = [session.post(f"{proxy.url}/predict", data=b"{}", timeout=10) for _ in range(4)]
    # The request had reached sam-2: only `non_idempotent` lets nginx send a POST again.
    assert [(a.status_code, served_by(a)) for a in answers] == [(200, "sam")] * 4
    assert proxy.replicas["sam-2"].requests


def test_a_replicas_error_answer_is_passed_on_not_retried(proxy):
    proxy.replicas["sam"].status = proxy.replicas["sam-2"].status = 503
    with requests.Session() as session:
        session.trust_env = False
        answer = session.post(f"{proxy.url}/predict", data=b"{}", timeout=10)
    assert answer.status_code == 503
    assert sum(len(r.requests) for r in proxy.replicas.values()) == 1


def test_large_interactive_bodies_pass(proxy):
    body = b"x" * (8 * 1024 * 1024)  # above nginx's 1 MB default, below MAX_REQUEST_MB
    with requests.Session() as session:
        session.trust_env = False
        answer = session.post(f"{proxy.url}/predict", data=body, timeout=30)
    assert answer.status_code == 200
    (replica,) = [r for r in proxy.replicas.values() if r.requests]
    assert replica.requests[0][2] == body
