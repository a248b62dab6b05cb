"""Bounds on one image fetch: a total deadline enforced on the socket, and fetches in flight per host.

Socket timeouts bound each single read, not a whole transfer: a host that sends one byte per
second never trips a 2 s read timeout, in the headers or in the body. So each fetch runs inside a
`Deadline`; every socket the fetch uses (new or reused from the pool) is registered with it
(`GuardedAdapter` mounts urllib3 connection classes that do so), and one watchdog thread shuts
those sockets down when the deadline passes. The blocked read then fails at once and the fetch
reports that it ran out of time.

`HostSlots` caps the fetches in flight per (scheme, host, port): a slow host can hold at most that
many worker threads; a fetch that finds its host full waits briefly, then fails with a 503
(`ImageHostBusy`), so requests for other hosts keep being served.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from backends.errors import BackendError


class ImageHostBusy(BackendError):
    """Too many fetches from one host are in flight (IMAGE_FETCH_PER_HOST): try again shortly."""

    status = 503


class Deadline:
    """A point in time (monotonic seconds) after which the registered sockets are shut down.

    Each registered socket is held through a duplicate of its file descriptor: shutting that down
    ends the TCP connection under a plain or TLS socket alike (TLS wrapping detaches the original
    socket object, and an SSLSocket must not be shut down from another thread), and closing it at
    the end of the fetch leaves the connection itself to its pool.
    """

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.expires_at = time.monotonic() + self.seconds
        self.expired = False
        self._done = False
        self._handles: list[socket.socket] = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        """Seconds left (0 when passed)."""
        return max(self.expires_at - time.monotonic(), 0.0)

    def register(self, sock: socket.socket | None) -> None:
        handle = _duplicate(sock)
        if handle is None:
            return
        with self._lock:
            if not self._done and not self.expired:
                self._handles.append(handle)
                return
            cut = self.expired and not self._done
        if cut:  # registered after the deadline: cut at once
            _shut(handle)
        handle.close()

    def expire(self) -> None:
        """Called by the watchdog at `expires_at`: shut down every connection still in use."""
        with self._lock:
            if self._done:
                return
            self.expired = True
            handles, self._handles = self._handles, []
        for handle in handles:
            _shut(handle)
            handle.close()

    def finish(self) -> None:
        """The fetch is over: its connections (back in the pool) must not be touched any more."""
        with self._lock:
            self._done = True
            handles, self._handles = self._handles, []
        for handle in handles:
            handle.close()


def _duplicate(sock: socket.socket | None) -> socket.socket | None:
    """A socket object on a duplicate of `sock`'s descriptor, or None when it is closed."""
    if sock is None:
        return None
    try:
        return socket.socket(fileno=os.dup(sock.fileno()))
    except (OSError, ValueError):
        return None


def _shut(handle: socket.socket) -> None:
    with contextlib.suppress(OSError):  # the connection is already gone
        handle.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """One daemon thread expiring deadlines in time order."""

    def __init__(self):
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: Deadline) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline.expires_at, next(self._order), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                expires_at, _, deadline = self._heap[0]
                wait = expires_at - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            deadline.expire()


_WATCHDOG = _Watchdog()
_current = threading.local()


@contextlib.contextmanager
def deadline_scope(seconds: float) -> Iterator[Deadline]:
    """Run one fetch under a total deadline: sockets the current thread uses through a
    `GuardedAdapter` inside the block are shut down when it passes."""
    deadline = Deadline(seconds)
    previous = getattr(_current, "deadline", None)
    _current.deadline = deadline
    _WATCHDOG.watch(deadline)
    try:
        yield deadline
    finally:
        deadline.finish()
        _current.deadline = previous


def _register_current(sock: socket.socket | None) -> None:
    deadline = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.register(sock)


class _GuardedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _register_current(sock)  # before any TLS handshake, so a dripped handshake is cut too
        return sock

    def request(self, *args, **kwargs):  # a pooled connection reused by a later fetch
        _register_current(self.sock)
        return super().request(*args, **kwargs)


class _GuardedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _register_current(sock)
        return sock

    def request(self, *args, **kwargs):
        _register_current(self.sock)
        return super().request(*args, **kwargs)


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """requests adapter whose connections register their sockets with the current `Deadline`."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


class HostSlots:
    """At most `per_host` fetches in flight per origin key; `slot()` waits up to `wait_s` for one."""

    def __init__(self, per_host: int, wait_s: float):
        self.per_host = max(int(per_host), 1)
        self.wait_s = max(float(wait_s), 0.0)
        self._busy: dict[tuple, int] = {}  # only hosts with fetches in flight: bounded by them
        self._cond = threading.Condition()
        self.refused = 0

    def in_flight(self) -> int:
        with self._cond:
            return sum(self._busy.values())

    @contextlib.contextmanager
    def slot(self, key: tuple, label: str, wait_s: float | None = None) -> Iterator[None]:
        wait = self.wait_s if wait_s is None else max(min(wait_s, self.wait_s), 0.0)
        give_up_at = time.monotonic() + wait
        with self._cond:
            while self._busy.get(key, 0) >= self.per_host:
                left = give_up_at - time.monotonic()
                if left <= 0:
                    self.refused += 1
                    raise ImageHostBusy(
                        f"image host {label} already has {self.per_host} fetches in flight "
                        "(IMAGE_FETCH_PER_HOST); it is slow or overloaded: try again shortly"
                    )
                self._cond.wait(left)
            self._busy[key] = self._busy.get(key, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                left_in_flight = self._busy[key] - 1
                if left_in_flight:
                    self._busy[key] = left_in_flight
                else:
                    del self._busy[key]
                self._cond.notify_all()
