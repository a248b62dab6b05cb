"""One loopback HTTP host for every test that needs a server on the other end of a URL.

`HttpHost` answers on 127.0.0.1:<port> (port 0: a free one, bound at construction so URLs can be
built before it starts) and records every request. Each request is answered by the route for its
path (`routes`: path -> Reply, PNG bytes, or a function of the request), else by `app(request)`,
else with a 404 HTML page. A `Reply` can also leave out its Content-Length (the body ends when the
connection closes) or drip, one byte at a time, its headers or its body (a slow host). `stop()`
and `start()` take the host down and bring it back on the same port (a service that restarts).

`SilentSocket` accepts connections and never answers; `closed_port_url()` is a URL where nothing
listens. Nothing here reaches beyond loopback.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, urlsplit

PNG = {"Content-Type": "image/png"}
NOT_FOUND_HTML = b"<html><body>Not found</body></html>"


@dataclass
class RecordedRequest:
    method: str
    path: str  # without the query string
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    at: float = 0.0  # time.monotonic() when it arrived

    def json(self):
        return json.loads(self.body or b"null")


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True  # False: no Content-Length, the body ends when the connection closes
    # "headers": the status line, then one header line that never ends; "body": the headers, then
    # the body; either one byte every `drip_s` seconds until the client gives up or the host stops.
    drip: str = ""
    drip_s: float = 1.0


App = Callable[[RecordedRequest], Reply]
Route = Reply | bytes | App  # bytes: a 200 image/png


def sequence(*replies: Reply) -> App:
    """A route answering `replies` in order, then the last one for ever (a host that recovers)."""
    remaining = list(replies)
    lock = threading.Lock()

    def answer(request: RecordedRequest) -> Reply:
        with lock:
            return remaining.pop(0) if len(remaining) > 1 else remaining[0]

    return answer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def _handle(self) -> None:
        host: HttpHost = self.server.host  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        request = RecordedRequest(
            self.command, parts.path, parse_qs(parts.query), dict(self.headers.items()), body, time.monotonic()
        )
        host.requests.append(request)
        try:
            self._send(host.answer(request), host.closing)
        except OSError:  # the client hung up (timeouts, deadlines): nothing to answer
            self.close_connection = True

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _handle

    def _send(self, reply: Reply, closing: threading.Event) -> None:
        if reply.drip == "headers":
            self.wfile.write(f"HTTP/1.1 {reply.status} OK\r\nX-Slow: ".encode())
            self._drip(iter(lambda: b"a", None), reply.drip_s, closing)
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.content_length:
            self.send_header("Content-Length", str(len(reply.body)))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        if reply.drip == "body":
            self._drip((reply.body[i : i + 1] for i in range(len(reply.body))), reply.drip_s, closing)
        else:
            self.wfile.write(reply.body)

    def _drip(self, chunks, interval_s: float, closing: threading.Event) -> None:
        self.close_connection = True
        self.wfile.flush()
        for chunk in chunks:
            if closing.wait(interval_s):
                return
            self.wfile.write(chunk)
            self.wfile.flush()

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


class HttpHost:
    """A threaded HTTP server on 127.0.0.1 answering from `routes`, then `app`, then 404 (see the
    module doc); `requests` records what arrived, in order. Use as a context manager."""

    def __init__(self, routes: Mapping[str, Route] | None = None, app: App | None = None, port: int = 0):
        self.routes: dict[str, Route] = dict(routes or {})
        self.app = app
        self.requests: list[RecordedRequest] = []
        self.closing = threading.Event()  # set by stop(): ends every drip
        self._httpd: ThreadingHTTPServer | None = self._bind(port)
        self.port: int = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def _bind(self, port: int) -> ThreadingHTTPServer:
        httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        httpd.daemon_threads = True
        httpd.host = self  # type: ignore[attr-defined]
        return httpd

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.netloc}"

    def add(self, path: str, route: Route) -> str:
        """Answer `path` with `route`; returns its full URL."""
        self.routes[path] = route
        return self.url + path

    def answer(self, request: RecordedRequest) -> Reply:
        route = self.routes.get(request.path)
        if route is None:
            route = self.app
        if route is None:
            return Reply(404, NOT_FOUND_HTML, {"Content-Type": "text/html"})
        if isinstance(route, bytes):
            return Reply(200, route, dict(PNG))
        return route if isinstance(route, Reply) else route(request)

    def paths(self) -> list[str]:
        return [request.path for request in self.requests]

    def hits(self, path: str) -> int:
        return sum(1 for request in self.requests if request.path == path)

    def times(self, path: str) -> list[float]:
        """time.monotonic() of each request for `path`, in order."""
        return [request.at for request in self.requests if request.path == path]

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> Self:
        if self._httpd is None:  # stopped before: back on the same port
            self._httpd = self._bind(self.port)
        self.closing.clear()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.closing.set()
        if self._httpd is None:
            return
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()
        self._httpd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


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

    def __enter__(self) -> Self:
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
