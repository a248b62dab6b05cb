"""Real HTTP servers on loopback (port 0) for tests: a Label Studio stand-in, storage hosts, silent sockets."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit


@dataclass
class RecordedRequest:
    method: str
    path: str  # without the query string
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body or b"null")


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True  # False: no Content-Length, the body ends when the connection closes


App = Callable[[RecordedRequest], Reply]


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1:<free port> answering every request with `app(request)`;
    `requests` records what arrived. Use as a context manager."""

    def __init__(self, app: App):
        self.app = app
        self.requests: list[RecordedRequest] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                request = RecordedRequest(
                    self.command, parts.path, parse_qs(parts.query), {k: v for k, v in self.headers.items()}, body
                )
                server.requests.append(request)
                reply = server.app(request)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.content_length:
                    self.send_header("Content-Length", str(len(reply.body)))
                else:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply.body)

            do_GET = do_POST = do_HEAD = _handle

            def log_message(self, *args):  # keep test output quiet
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [request.path for request in self.requests]

    def __enter__(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class SilentSocket:
    """Listens on 127.0.0.1:<free port> and never answers: connections complete (kernel backlog)
    and then every read times out."""

    def __init__(self):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __enter__(self) -> "SilentSocket":
        return self

    def __exit__(self, *exc) -> None:
        self._sock.close()


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


# ------------------------------------------------------------------------- JWTs like Label Studio's
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(payload: dict, key: bytes = b"test-signing-key") -> str:
    """An HS256 JWT (the client only reads `exp`; the signature is real anyway)."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(payload).encode())
    signature = hmac.new(key, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(signature)}"


class FakeLabelStudio:
    """The parts of Label Studio 1.23 an image fetcher meets: token refresh, uploads, resolve, health.

    - legacy token `legacy_token` ("Token ..."), or a PAT `pat` exchanged at /api/token/refresh/ for
      access tokens valid `access_lifetime_s` (checked against the server's clock);
    - `files`: path -> bytes served with auth; `resolve`: URI -> Reply for /tasks/<id>/resolve/;
    - `revoke_access()` makes every issued access token invalid (as after a server restart).
    """

    def __init__(self, access_lifetime_s: float = 300.0):
        self.legacy_token = "0123456789abcdef0123456789abcdef01234567"
        self.pat = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 86400, "jti": "pat-1", "user_id": 1})
        self.access_lifetime_s = access_lifetime_s
        self.issued: dict[str, float] = {}  # access token -> expiry
        self.refreshes = 0
        self.files: dict[str, Reply] = {}
        self.resolve: dict[str, Reply] = {}
        self.resolve_calls: list[tuple[int, str]] = []
        self.healthy = True
        self.server = LoopbackServer(self.handle)

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> "FakeLabelStudio":
        self.server.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.server.__exit__(*exc)

    def revoke_access(self) -> None:
        self.issued.clear()

    def authorised(self, request: RecordedRequest) -> bool:
        header = request.headers.get("Authorization", "")
        if header == f"Token {self.legacy_token}":
            return True
        if header.startswith("Bearer "):
            expiry = self.issued.get(header[len("Bearer "):])
            return expiry is not None and time.time() < expiry
        return False

    def handle(self, request: RecordedRequest) -> Reply:
        if request.path == "/health":
            return Reply(200 if self.healthy else 500, b'{"status": "UP"}')
        if request.path == "/api/token/refresh/" and request.method == "POST":
            return self._refresh(request)
        if not self.authorised(request):
            return Reply(401, b'{"detail": "Authentication credentials were not provided."}',
                         {"Content-Type": "application/json"})
        if request.path.startswith("/tasks/") and request.path.endswith("/resolve/"):
            task_id = int(request.path.split("/")[2])
            fileuri = base64.urlsafe_b64decode(request.query["fileuri"][0]).decode()
            self.resolve_calls.append((task_id, fileuri))
            return self.resolve.get(fileuri, Reply(404, b"not found"))
        full = request.path + ("?" + "&".join(f"{k}={v[0]}" for k, v in request.query.items()) if request.query else "")
        return self.files.get(full, Reply(404, b"<html>Not found</html>"))

    def _refresh(self, request: RecordedRequest) -> Reply:
        if request.json().get("refresh") != self.pat:
            return Reply(401, b'{"detail": "Token is invalid", "code": "token_not_valid"}')
        self.refreshes += 1
        expiry = time.time() + self.access_lifetime_s
        access = make_jwt({"token_type": "access", "exp": int(expiry), "jti": f"a{self.refreshes}", "user_id": 1})
        self.issued[access] = expiry
        return Reply(200, json.dumps({"access": access}).encode(), {"Content-Type": "application/json"})
