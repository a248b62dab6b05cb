"""ByteLRU: byte cap, eviction order, single-flight, errors, metrics."""

from __future__ import annotations

import functools
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from backends.metrics import Metrics
from sam.embedding_cache import ByteLRU, nbytes


def sized(n: int) -> bytes:
    return b"x" * n


def test_put_get_and_byte_accounting():
    cache = ByteLRU(100, sizeof=len)
    cache.put("a", sized(30))
    cache.put("b", sized(50))
    assert cache.bytes == 80 and len(cache) == 2
    assert cache.get("a") == sized(30)
    assert "b" in cache and "c" not in cache
    assert cache.get("c") is None
    cache.put("a", sized(10))  # replacing a key frees its old size
    assert cache.bytes == 60


def test_least_recently_used_is_evicted_first():
    cache = ByteLRU(100, sizeof=len)
    for key in "abcd":
        cache.put(key, sized(25))
    cache.get("a")  # a becomes the most recent: b is now the oldest
    cache.put("e", sized(25))
    assert "b" not in cache
    assert all(key in cache for key in "acde")
    cache.get_or_compute("c", lambda: pytest.fail("c is cached"))  # a hit refreshes c too
    cache.put("f", sized(50))  # needs two slots: d then a go
    assert [key for key in "acdef" if key in cache] == ["c", "e", "f"]
    assert cache.evictions == 3
    assert cache.bytes == 100


def test_a_value_larger_than_the_cap_is_returned_but_not_stored():
    cache = ByteLRU(100, sizeof=len)
    cache.put("small", sized(60))
    big = cache.get_or_compute("big", lambda: sized(101))
    assert big == sized(101)
    assert "big" not in cache
    assert "small" in cache  # nothing evicted for a value that could never fit
    assert cache.bytes == 60


def test_zero_capacity_stores_nothing():
    cache = ByteLRU(0, sizeof=len)
    assert cache.get_or_compute("a", lambda: sized(1)) == sized(1)
    assert "a" not in cache and cache.bytes == 0


def test_hits_and_misses_are_counted():
    cache = ByteLRU(100, sizeof=len)
    calls = []
    for _ in range(3):
        cache.get_or_compute("k", lambda: calls.append(1) or sized(10))
    assert len(calls) == 1
    assert (cache.hits, cache.misses) == (2, 1)


def test_single_flight_computes_once_for_many_concurrent_callers():
    cache = ByteLRU(1000, sizeof=len)
    computes = 0
    started = threading.Event()
    release = threading.Event()

    def compute() -> bytes:
        nonlocal computes
        computes += 1
        started.set()
        release.wait(5)
        return sized(10)

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(cache.get_or_compute, "img", compute) for _ in range(16)]
        assert started.wait(5)
        time.sleep(0.05)  # let every caller arrive while the computation is running
        release.set()
        values = [future.result(5) for future in futures]
    assert computes == 1
    assert all(value is values[0] for value in values)  # the very same object
    assert cache.misses == 1 and cache.hits == 15


def test_compute_runs_outside_the_lock_so_other_keys_proceed():
    cache = ByteLRU(1000, sizeof=len)
    release = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(cache.get_or_compute, "slow", lambda: release.wait(5) and sized(1))
        time.sleep(0.02)
        started = time.perf_counter()
        assert cache.get_or_compute("fast", lambda: sized(2)) == sized(2)
        cache.put("other", sized(3))
        assert cache.get("other") == sized(3)
        assert time.perf_counter() - started < 0.5
        release.set()
        assert slow.result(5) == sized(1)


def test_an_exception_reaches_every_waiter_and_nothing_is_cached():
    cache = ByteLRU(1000, sizeof=len)
    started = threading.Event()
    release = threading.Event()

    def failing() -> bytes:
        started.set()
        release.wait(5)
        raise OSError("image not found")

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(cache.get_or_compute, "img", failing) for _ in range(8)]
        assert started.wait(5)
        time.sleep(0.05)
        release.set()
        for future in futures:
            with pytest.raises(OSError, match="image not found"):
                future.result(5)
    assert "img" not in cache and cache.bytes == 0
    # The failure is not remembered: the next caller computes again and can succeed.
    assert cache.get_or_compute("img", lambda: sized(4)) == sized(4)
    assert cache.misses == 2


def test_a_failing_sizeof_caches_nothing_and_frees_the_key():
    def sizeof(value: bytes) -> int:
        if value == b"bad":
            raise ValueError("cannot size")
        return len(value)

    cache = ByteLRU(1000, sizeof=sizeof)
    with pytest.raises(ValueError, match="cannot size"):
        cache.get_or_compute("k", lambda: b"bad")
    assert cache.get_or_compute("k", lambda: b"good") == b"good"


def test_negative_sizes_are_refused():
    cache = ByteLRU(1000, sizeof=lambda value: -1)
    with pytest.raises(ValueError, match="negative"):
        cache.put("k", b"x")
    with pytest.raises(ValueError):
        ByteLRU(-1, sizeof=len)


def test_the_cap_is_never_exceeded_under_concurrent_hammering():
    capacity = 10_000
    cache = ByteLRU(capacity, sizeof=len)
    over_cap = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if cache.bytes > capacity:
                over_cap.append(cache.bytes)

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(2000):
            key = rng.randrange(60)
            size = rng.choice([0, 1, 300, 999, 2500, 4000, 10_000, 12_000])
            action = rng.random()
            if action < 0.5:
                value = cache.get_or_compute(key, functools.partial(sized, size))
                assert isinstance(value, bytes)
            elif action < 0.8:
                cache.put(key, sized(size))
            elif action < 0.95:
                cache.get(key)
            else:
                cache.discard(key)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(hammer, range(8)))
    stop.set()
    watcher.join()
    assert over_cap == []
    # The running total matches what is actually stored.
    stored = sum(len(cache.get(key) or b"") for key in range(60) if key in cache)
    assert cache.bytes == stored <= capacity


def test_metrics_report_hits_misses_bytes_and_evictions():
    metrics = Metrics()
    cache = ByteLRU(100, sizeof=len, name="embeddings", metrics=metrics)
    other = ByteLRU(50, sizeof=len, name="images", metrics=metrics)  # shares the metric families
    cache.get_or_compute("a", lambda: sized(60))
    cache.get_or_compute("a", lambda: sized(60))
    cache.put("b", sized(60))  # evicts a
    other.put("x", sized(5))
    text = metrics.render()[0].decode()
    assert 'cache_hits_total{cache="embeddings"} 1.0' in text
    assert 'cache_misses_total{cache="embeddings"} 1.0' in text
    assert 'cache_evictions_total{cache="embeddings"} 1.0' in text
    assert 'cache_bytes{cache="embeddings"} 60.0' in text
    assert 'cache_capacity_bytes{cache="embeddings"} 100.0' in text
    assert 'cache_bytes{cache="images"} 5.0' in text


def test_metrics_refuses_a_name_reused_with_other_labels():
    metrics = Metrics()
    assert metrics.counter("jobs", "doc", ("kind",)) is metrics.counter("jobs_total", "doc", ("kind",))
    with pytest.raises(ValueError, match="already exists"):
        metrics.gauge("jobs", "doc", ("kind",))
    with pytest.raises(ValueError, match="already exists"):
        metrics.counter("jobs", "doc", ("other",))


def test_nbytes_of_arrays_tensors_and_containers():
    torch = pytest.importorskip("torch")
    embedding = np.zeros((256, 64, 64), dtype=np.float32)
    assert nbytes(embedding) == 256 * 64 * 64 * 4
    assert nbytes(torch.zeros(2, 3, dtype=torch.float16)) == 12
    assert nbytes((embedding, {"size": np.zeros(2, np.int64)}, b"abc", None)) == embedding.nbytes + 16 + 3
    assert nbytes("not sized") == 0
