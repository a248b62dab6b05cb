"""A thread-safe least-recently-used cache bounded in bytes, with single-flight computation.

Used for image embeddings (SAM) and decoded images: values are large (megabytes), expensive to
compute (seconds), and asked for concurrently by several annotators on the same image.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from backends.metrics import Metrics

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def nbytes(value: Any) -> int:
    """Approximate memory held by `value`: NumPy arrays and torch tensors by their buffers,
    bytes by length, tuples/lists/dicts/dataclasses by the sum of their items; others count 0.
    """
    if value is None:
        return 0
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if hasattr(value, "element_size") and hasattr(value, "nelement"):  # torch.Tensor
        return int(value.element_size() * value.nelement())
    if hasattr(value, "nbytes"):  # numpy.ndarray and friends
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(nbytes(item) for item in value.values())
    if isinstance(value, (tuple, list)):
        return sum(nbytes(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # e.g. an embedding record
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


class _Flight:
    """One computation in progress; the callers that arrive meanwhile wait on `done`."""

    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class ByteLRU(Generic[K, V]):
    """LRU cache whose total `sizeof(value)` never exceeds `capacity_bytes`.

    - `get_or_compute(key, compute)`: on a miss, exactly one caller runs `compute()` (outside the
      lock); concurrent callers of the same key wait for it and get the same value. If `compute`
      raises, every waiter gets the exception and nothing is cached.
    - A value larger than the whole capacity is returned but not stored.
    - `hits` counts callers served without computing (stored values and waits on a flight),
      `misses` counts computations started.
    """

    def __init__(
        self,
        capacity_bytes: int,
        sizeof: Callable[[V], int] = nbytes,
        name: str = "cache",
        metrics: Metrics | None = None,
    ):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        self.name = name
        self._sizeof = sizeof
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._flights: dict[K, _Flight] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._metrics = _CacheMetrics(metrics, name, self.capacity_bytes) if metrics is not None else None

    # -- reading -----------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        """Bytes currently stored (sum of `sizeof` of the stored values)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[K]:
        """A snapshot of the stored keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: K) -> V | None:
        """The stored value (marked most recently used), or None; does not count hits/misses."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._count_hit()
                return entry[0]
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
                self._count_miss()
            else:
                self._count_hit()

        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value

        try:
            value = compute()
            size = self._size_of(value)
        except BaseException as error:
            with self._lock:
                del self._flights[key]
            flight.error = error
            flight.done.set()
            raise
        with self._lock:
            del self._flights[key]
            self._store(key, value, size)
        flight.value = value
        flight.done.set()
        return value

    # -- writing -----------------------------------------------------------------------------

    def put(self, key: K, value: V) -> None:
        """Store `value` (replacing any value under `key`), evicting least recently used entries."""
        size = self._size_of(value)
        with self._lock:
            self._store(key, value, size)

    def discard(self, key: K) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry[1]
                self._report_bytes()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._report_bytes()

    # -- internals (called with the lock held unless noted) ----------------------------------

    def _size_of(self, value: V) -> int:  # without the lock: sizeof may walk large structures
        size = int(self._sizeof(value))
        if size < 0:
            raise ValueError(f"{self.name}: sizeof returned a negative size ({size})")
        return size

    def _store(self, key: K, value: V, size: int) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        if size > self.capacity_bytes:
            self._report_bytes()
            return
        while self._bytes + size > self.capacity_bytes and self._entries:
            _, (_, evicted_size) = self._entries.popitem(last=False)
            self._bytes -= evicted_size
            self.evictions += 1
            if self._metrics is not None:
                self._metrics.evictions.inc()
        self._entries[key] = (value, size)
        self._bytes += size
        self._report_bytes()

    def _count_hit(self) -> None:
        self.hits += 1
        if self._metrics is not None:
            self._metrics.hits.inc()

    def _count_miss(self) -> None:
        self.misses += 1
        if self._metrics is not None:
            self._metrics.misses.inc()

    def _report_bytes(self) -> None:
        if self._metrics is not None:
            self._metrics.bytes.set(self._bytes)
            self._metrics.entries.set(len(self._entries))


class _CacheMetrics:
    """The cache's children of the shared `cache_*` metrics, labelled with the cache's name."""

    def __init__(self, metrics: Metrics, name: str, capacity_bytes: int):
        labels = ("cache",)
        self.hits = metrics.counter("cache_hits", "Cache lookups served without computing", labels).labels(name)
        self.misses = metrics.counter("cache_misses", "Cache lookups that computed the value", labels).labels(name)
        self.evictions = metrics.counter("cache_evictions", "Entries evicted to respect the byte cap", labels).labels(
            name
        )
        self.bytes = metrics.gauge("cache_bytes", "Bytes currently held by the cache", labels).labels(name)
        self.entries = metrics.gauge("cache_entries", "Entries currently held by the cache", labels).labels(name)
        metrics.gauge("cache_capacity_bytes", "Byte cap of the cache", labels).labels(name).set(capacity_bytes)
