"""A Redis connection that fails fast and comes back by itself, and what /health says about it.

Every call has a short socket timeout (REDIS_TIMEOUT_S) and no client-side retries: a
click must never wait seconds for a cache. When Redis does not answer the link is "down": calls
return their default at once, without touching the network, until the next probe (after 0.5 s,
then doubling up to 30 s); the first call that succeeds brings it back "up". Errors that Redis
answers with (a full `noeviction` Redis, a key of another type) are counted and reported, but do not
take the link down.

The URL's password never leaves this module: `safe_url` drops it, and error texts are redacted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from backends.logs import redact

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
_WARN_EVERY_S = 10.0  # answered errors (not outages) are logged at most this often


def safe_url(url: str) -> str:
    """`url` without its password (and without a username when there is only a password)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    if parts.username:
        host = f"{parts.username}@{host}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class RedisLink:
    """One Redis client (a thread-safe connection pool) with the up/down state described above.

    `clock`: monotonic seconds (tests pass their own); `on_error`: called once per error (a metric).
    """

    def __init__(
        self,
        url: str,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        import redis  # only here: without REDIS_URL no replica imports redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = safe_url(url)
        self._secret = urlsplit(url).password or ""
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._outage_errors: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._answered_errors: tuple[type[BaseException], ...] = (redis.RedisError,)
        self._clock = clock
        self._on_error = on_error
        self._lock = threading.Lock()
        self.state = "starting"
        self.errors = 0
        self.last_error = ""
        self.last_error_at = ""
        self._down_since = ""
        self._backoff = FIRST_BACKOFF_S
        self._next_probe = 0.0
        self._last_warning = -_WARN_EVERY_S

    def call(self, operation: Callable[[Any], T], default: T, what: str) -> T:
        """`operation(client)`, or `default` when Redis is down (no network) or the call fails."""
        if not self._may_try():
            return default
        try:
            result = operation(self.client)
        except self._outage_errors as error:
            self._went_down(error, what)
            return default
        except self._answered_errors as error:
            self._answered_error(error, what)
            return default
        self._up()
        return result

    def ping(self) -> bool:
        return bool(self.call(lambda client: client.ping(), False, "PING"))

    @property
    def up(self) -> bool:
        return self.state == "up"

    def note_bad_value(self, reason: str) -> None:
        """A value read from Redis was refused (counted with the errors, logged like them)."""
        self._record(f"a stored value was refused: {reason}")
        self._warn_now("Redis shared cache: %s", self.last_error)

    def health(self) -> dict:
        with self._lock:
            report: dict[str, Any] = {"state": self.state, "url": self.url, "errors": self.errors}
            if self.last_error:
                report["last_error"] = self.last_error
                report["last_error_at"] = self.last_error_at
            if self.state == "down":
                report["down_since"] = self._down_since
                report["retry_in_s"] = round(max(0.0, self._next_probe - self._clock()), 1)
            return report

    # -- state --------------------------------------------------------------------------------------

    def _may_try(self) -> bool:
        with self._lock:
            if self.state != "down":
                return True
            now = self._clock()
            if now < self._next_probe:
                return False
            self._next_probe = now + self._backoff  # this caller probes; the others keep skipping
            return True

    def _went_down(self, error: BaseException, what: str) -> None:
        self._record(f"{what}: {type(error).__name__}: {error}")
        with self._lock:
            was_down = self.state == "down"
            if not was_down:
                self._down_since = _now_iso()
                self._backoff = FIRST_BACKOFF_S
            else:
                self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
            self.state = "down"
            self._next_probe = self._clock() + self._backoff
        if not was_down:
            log.warning(
                "Redis shared cache at %s is unreachable (%s): answering from this replica's memory only; "
                "retrying in the background",
                self.url,
                self.last_error,
            )

    def _answered_error(self, error: BaseException, what: str) -> None:
        self._record(f"{what}: {type(error).__name__}: {error}")
        self._up()
        self._warn_now("Redis shared cache at %s answered an error: %s", self.url, self.last_error)

    def _up(self) -> None:
        with self._lock:
            if self.state == "up":
                return
            was_down, self.state = self.state == "down", "up"
            self._backoff = FIRST_BACKOFF_S
        if was_down:
            log.warning("Redis shared cache at %s is back", self.url)

    def _record(self, message: str) -> None:
        if self._secret:
            message = message.replace(self._secret, "[REDACTED]")
        with self._lock:
            self.errors += 1
            self.last_error = redact(message)[:300]
            self.last_error_at = _now_iso()
        if self._on_error is not None:
            self._on_error()

    def _warn_now(self, message: str, *args: Any) -> None:
        now = self._clock()
        with self._lock:
            if now - self._last_warning < _WARN_EVERY_S:
                return
            self._last_warning = now
        log.warning(message, *args)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
