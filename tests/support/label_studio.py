"""A stand-in for the parts of Label Studio 1.23 the backends and scripts talk to, on loopback.

`FakeLabelStudio` serves, on one `HttpHost` (`.server`, its `.requests` recorded):
- `GET /health` (200 while `healthy`, else 500), without auth;
- `POST /api/token/refresh/`: a personal access token `pat` exchanged for access tokens valid
  `access_lifetime_s` (checked against the clock); `revoke_access()` invalidates them all;
- everything else only with `Token <legacy_token>` or a valid `Bearer <access token>`, else 401:
  `/tasks/<id>/resolve/?fileuri=...` (`resolve`: URI -> Reply; calls in `resolve_calls`),
  `/api/projects/<id>` (`projects`: id -> label config), `/api/projects/<id>/export`
  (`exports`: id -> list of tasks, answered with status `export_status`), and `files`
  (path with its query -> Reply: uploads, local files, redirects);
- 404 for anything else, also for paths it cannot parse (a fuzzer's), never a dropped connection.
`stop()` and `start()` take it down and back on the same port. `make_jwt` writes Label Studio-like JWTs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Self

from tests.support.http_host import HttpHost, RecordedRequest, Reply

LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"
JSON = {"Content-Type": "application/json"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(payload: dict, key: bytes = b"test-signing-key") -> str:
    """An HS256 JWT (the client only reads `exp`; the signature is real anyway)."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(payload).encode())
    signature = hmac.new(key, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(signature)}"


class FakeLabelStudio:
    """See the module doc. Use as a context manager; `url` is known before it starts."""

    def __init__(self, access_lifetime_s: float = 300.0, legacy_token: str = LEGACY_TOKEN):
        self.legacy_token = legacy_token
        self.pat = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 86400, "jti": "pat-1", "user_id": 1})
        self.access_lifetime_s = access_lifetime_s
        self.issued: dict[str, float] = {}  # access token -> expiry
        self.refreshes = 0
        self.files: dict[str, Reply] = {}
        self.resolve: dict[str, Reply] = {}
        self.resolve_calls: list[tuple[int, str]] = []
        self.projects: dict[int, str] = {}
        self.exports: dict[int, list[dict]] = {}
        self.export_status = 200
        self.healthy = True
        self.server = HttpHost(app=self.handle)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> Self:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def revoke_access(self) -> None:
        self.issued.clear()

    def authorised(self, request: RecordedRequest) -> bool:
        header = request.headers.get("Authorization", "")
        if header == f"Token {self.legacy_token}":
            return True
        if header.startswith("Bearer "):
            expiry = self.issued.get(header[len("Bearer ") :])
            return expiry is not None and time.time() < expiry
        return False

    def handle(self, request: RecordedRequest) -> Reply:
        try:
            return self._route(request)
        except (ValueError, KeyError, IndexError, AttributeError, TypeError):  # a path, query or body it cannot parse
            return Reply(404, b'{"detail": "Not found."}', dict(JSON))

    def _route(self, request: RecordedRequest) -> Reply:
        path = request.path
        if path == "/health":
            return Reply(200 if self.healthy else 500, b'{"status": "UP"}')
        if path == "/api/token/refresh/" and request.method == "POST":
            return self._refresh(request)
        if not self.authorised(request):
            return Reply(401, b'{"detail": "Authentication credentials were not provided."}', dict(JSON))
        if path.startswith("/tasks/") and path.endswith("/resolve/"):
            task_id = int(path.split("/")[2])
            fileuri = base64.urlsafe_b64decode(request.query["fileuri"][0]).decode()
            self.resolve_calls.append((task_id, fileuri))
            return self.resolve.get(fileuri, Reply(404, b"not found"))
        if path.startswith("/api/projects/"):
            return self._project(path.removeprefix("/api/projects/").strip("/").split("/"))
        query = "&".join(f"{key}={values[0]}" for key, values in request.query.items())
        return self.files.get(path + ("?" + query if query else ""), Reply(404, b"<html>Not found</html>"))

    def _project(self, parts: list[str]) -> Reply:
        project_id = int(parts[0])
        if parts[1:] == [] and project_id in self.projects:
            body = {"id": project_id, "label_config": self.projects[project_id]}
            return Reply(200, json.dumps(body).encode(), dict(JSON))
        if parts[1:] == ["export"] and project_id in self.exports:
            return Reply(self.export_status, json.dumps(self.exports[project_id]).encode(), dict(JSON))
        return Reply(404, b'{"detail": "Not found."}', dict(JSON))

    def _refresh(self, request: RecordedRequest) -> Reply:
        if request.json().get("refresh") != self.pat:
            return Reply(401, b'{"detail": "Token is invalid", "code": "token_not_valid"}')
        self.refreshes += 1
        expiry = time.time() + self.access_lifetime_s
        access = make_jwt({"token_type": "access", "exp": int(expiry), "jti": f"a{self.refreshes}", "user_id": 1})
        self.issued[access] = expiry
        return Reply(200, json.dumps({"access": access}).encode(), dict(JSON))
