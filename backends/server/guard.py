"""What wraps every request: metrics, one log line, basic auth, the body cap, error answers.

`RequestGuard` is a pure ASGI middleware, outermost, so it also sees what never reaches a route
(401, 413, and unexpected exceptions, which it answers with a 500 while the server keeps serving).
`install_error_handlers` turns the routes' exceptions into `{"error": "<what was wrong>"}` answers.
Nothing here logs a request body: bodies hold tokens and masks. Every error answer is redacted like
a log line (`error_response` -> backends.logs.redact): a message that names a URL with user:password
or quotes a token never reaches the client.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.errors import BackendError, BadRequest, PayloadTooLarge
from backends.logs import redact
from backends.metrics import Metrics
from backends.settings import Settings

log = logging.getLogger("backends.server.app")

ENDPOINTS = ("/", "/health", "/setup", "/predict", "/webhook", "/versions", "/metrics", "/status.json", "/static")
# Requests that arrive every few seconds (the status page polls /status.json): logged at DEBUG only.
_QUIET_ENDPOINTS = {"/", "/health", "/metrics", "/status.json", "/static"}


# -- JSON out -------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    """NumPy scalars and arrays (RLE counts, scores) as plain JSON numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class JSONAnswer(JSONResponse):
    """JSON that also accepts NumPy values (models return RLE counts and scores as NumPy)."""

    def render(self, content: Any) -> bytes:
        # orjson: a detailed mask's RLE holds 10^5-10^6 integers, which the json module takes
        # ~16 ms to write for a 1024x768 image (orjson ~1 ms). NaN and infinity become null.
        return orjson.dumps(content, default=_json_default, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def redact_answer(value: Any) -> Any:
    """`value` (JSON-like: dicts, lists, strings) with every string redacted as log lines are
    (backends.logs.redact): an answer must not carry a token or a password either."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_answer(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_answer(item) for item in value]
    return value


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None, **extra: Any) -> Response:
    """Every error answer goes through here: `{"error": message, **extra}`, secrets redacted."""
    return JSONAnswer(redact_answer({"error": message, **extra}), status_code=status, headers=headers)


def endpoint_label(path: str) -> str:
    """The metrics label of a request path: a known endpoint, else "other" (bounded cardinality)."""
    normalized = path.rstrip("/") or "/"
    if normalized.startswith("/static/"):  # the status page's few files, one label
        normalized = "/static"
    return normalized if normalized in ENDPOINTS else "other"


# -- telemetry ------------------------------------------------------------------------------


class Telemetry:
    """The server's own metrics: requests, latencies, errors, predicted tasks, webhook jobs."""

    def __init__(self, metrics: Metrics):
        self.requests = metrics.counter("requests", "HTTP requests answered", ("endpoint", "status"))
        self.seconds = metrics.histogram("request_seconds", "HTTP request latency", ("endpoint",))
        self.errors = metrics.counter("errors", "Requests or background jobs that failed", ("endpoint", "kind"))
        self.predictions = metrics.counter("predicted_tasks", "Tasks predicted", ("mode",))
        self.webhooks = metrics.counter("webhook_jobs", "Webhook jobs run in the background", ("action", "outcome"))
        # Pre-create the common series so they read 0 before the first request.
        for endpoint in ENDPOINTS:
            self.seconds.labels(endpoint)

    def error(self, endpoint: str, kind: str) -> None:
        self.errors.labels(endpoint, kind).inc()


# -- the outer guard (pure ASGI, so it sees every request, including 401/413/500) -------------


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings, telemetry: Telemetry):
        self.app = app
        self.telemetry = telemetry
        self.max_body_bytes = int(settings.max_request_mb * 1024 * 1024)
        self.credentials: tuple[bytes, bytes] | None = None
        settings.validate()  # half-configured basic auth (user or password alone) must not serve
        if settings.basic_auth_user:
            self.credentials = (settings.basic_auth_user.encode(), settings.basic_auth_pass.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = endpoint_label(scope["path"])
        started_at = time.perf_counter()
        status = 500
        response_started = False

        async def send_tracked(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
            await send(message)

        try:
            if not self._authorised(scope):
                self.telemetry.error(endpoint, "unauthorized")
                response = error_response(
                    401,
                    "authentication required: this backend expects HTTP basic auth (BASIC_AUTH_USER/BASIC_AUTH_PASS)",
                    headers={"WWW-Authenticate": 'Basic realm="ml-backend", charset="UTF-8"'},
                )
                await response(scope, receive, send_tracked)
                return
            try:
                replay = await self._read_body(scope, receive)
            except BackendError as error:
                self.telemetry.error(endpoint, type(error).__name__)
                await error_response(error.status, error.message)(scope, receive, send_tracked)
                return
            if replay is None:  # the client went away while sending
                status = 499
                return
            receive = replay
            await self.app(scope, receive, send_tracked)
        except Exception as error:
            # Anything the routes did not turn into an answer: log it with its traceback (the
            # body is never logged) and answer 500 so the annotator sees a message.
            log.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            self.telemetry.error(endpoint, "internal")
            if not response_started:
                response = error_response(
                    500, f"internal error ({type(error).__name__}) in {endpoint}; see the ML backend log"
                )
                await response(scope, receive, send_tracked)
        finally:
            elapsed = time.perf_counter() - started_at
            self.telemetry.requests.labels(endpoint, str(status)).inc()
            self.telemetry.seconds.labels(endpoint).observe(elapsed)
            level = logging.DEBUG if endpoint in _QUIET_ENDPOINTS and status < 400 else logging.INFO
            log.log(level, "%s %s -> %d in %.1f ms", scope["method"], scope["path"], status, elapsed * 1000)

    def _authorised(self, scope: Scope) -> bool:
        if self.credentials is None:
            return True
        header = _header(scope, b"authorization")
        if not header or header[:6].lower() != b"basic ":
            return False
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, _, password = decoded.partition(b":")
        # Compare both parts always, in constant time, so timing says nothing about which failed.
        user_ok = hmac.compare_digest(user, self.credentials[0])
        password_ok = hmac.compare_digest(password, self.credentials[1])
        return user_ok and password_ok

    async def _read_body(self, scope: Scope, receive: Receive) -> Receive | None:
        """Read the whole body (at most the cap) and return a `receive` that replays it."""
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                declared_bytes = int(declared)
            except ValueError:
                raise BadRequest("invalid Content-Length header") from None
            if declared_bytes > limit:
                raise PayloadTooLarge(_too_large_message(declared_bytes, limit))
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(_too_large_message(received, limit, streamed=True))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # waits for the disconnect

        return replay


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


def _too_large_message(size: int, limit: int, streamed: bool = False) -> str:
    amount = f"more than {_human_bytes(size)}" if streamed else _human_bytes(size)
    return f"request body is {amount}; this backend accepts at most {_human_bytes(limit)} (MAX_REQUEST_MB)"


def _human_bytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size:,} bytes"


def install_error_handlers(app: FastAPI, telemetry: Telemetry) -> None:
    @app.exception_handler(BackendError)
    async def backend_error(request: Request, error: BackendError) -> Response:
        endpoint = endpoint_label(request.url.path)
        log.warning("%s %s -> %d: %s", request.method, request.url.path, error.status, error.message)
        telemetry.error(endpoint, type(error).__name__)
        return error_response(error.status, error.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> Response:
        endpoint = endpoint_label(request.url.path)
        problems = error.errors()
        malformed = next((p for p in problems if p.get("type") == "json_invalid"), None)
        if malformed is not None:
            reason = (malformed.get("ctx") or {}).get("error", "invalid JSON")
            location = malformed.get("loc", ())
            if len(location) > 1 and isinstance(location[1], int):
                reason += f" at character {location[1]}"
            telemetry.error(endpoint, "invalid_json")
            return error_response(400, f"malformed JSON body: {reason}")
        if any(tuple(p.get("loc", ())) == ("body",) for p in problems):
            telemetry.error(endpoint, "validation")
            return error_response(422, "the request body must be a JSON object (Content-Type: application/json)")
        # Say where and what, never echo the input (it may hold tokens or masks).
        details = [{"field": _field_path(p.get("loc", ())), "problem": p.get("msg", "invalid")} for p in problems]
        summary = "; ".join(f"{d['field']}: {d['problem']}" for d in details[:5])
        if len(details) > 5:
            summary += f"; and {len(details) - 5} more"
        telemetry.error(endpoint, "validation")
        return error_response(422, f"invalid request body: {summary}", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        telemetry.error(endpoint_label(request.url.path), f"http_{error.status_code}")
        return error_response(
            error.status_code, f"{error.detail}: {request.method} {request.url.path}", headers=error.headers
        )


def _field_path(location: tuple | list) -> str:
    parts = [str(part) for part in location]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"
