"""ImageCache: byte cap never exceeded, LRU order, atomic files, restarts, concurrency."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import threading
from pathlib import Path

from backends.images.disk_cache import ImageCache


def disk_bytes(directory: Path) -> int:
    """Bytes in `directory`, tolerating files that vanish while it is listed (concurrent eviction)."""
    total = 0
    for path in directory.iterdir() if directory.exists() else ():
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def test_round_trip_under_hashed_names(tmp_path):
    cache = ImageCache(tmp_path / "c", 1000)
    identity = "7:/data/upload/1/secret-name.png"
    assert cache.get(identity) is None
    cache.put(identity, b"abc")
    assert cache.get(identity) == b"abc"
    names = os.listdir(tmp_path / "c")
    assert names == [hashlib.sha256(identity.encode()).hexdigest()]
    counts = {
        "hits": cache.hits,
        "misses": cache.misses,
        "evictions": cache.evictions,
        "bytes": cache.total_bytes,
        "entries": len(cache),
        "capacity_bytes": cache.capacity_bytes,
    }
    assert counts == {"hits": 1, "misses": 1, "evictions": 0, "bytes": 3, "entries": 1, "capacity_bytes": 1000}


def test_least_recently_used_is_evicted_first(tmp_path):
    cache = ImageCache(tmp_path, 300)
    for name in "abc":
        cache.put(name, name.encode() * 100)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", b"d" * 100)
    assert cache.get("b") is None
    assert [cache.get(name) is not None for name in "acd"] == [True, True, True]
    assert cache.total_bytes == disk_bytes(tmp_path) == 300


def test_capacity_is_never_exceeded(tmp_path):
    rng = random.Random(0)
    cache = ImageCache(tmp_path, 10_000)
    for _ in range(200):
        cache.put(f"k{rng.randrange(60)}", bytes(rng.randrange(1, 3000)))
        assert disk_bytes(tmp_path) <= 10_000
        assert cache.total_bytes == disk_bytes(tmp_path)


def test_replacing_an_entry_counts_it_once(tmp_path):
    cache = ImageCache(tmp_path, 100)
    cache.put("a", b"x" * 60)
    cache.put("a", b"y" * 70)
    assert cache.get("a") == b"y" * 70
    assert cache.total_bytes == 70 and len(cache) == 1


def test_items_larger_than_the_capacity_are_not_stored(tmp_path):
    cache = ImageCache(tmp_path, 100)
    cache.put("small", b"s" * 50)
    cache.put("huge", b"h" * 101)
    assert cache.get("huge") is None
    assert cache.get("small") == b"s" * 50  # and nothing was evicted for it


def test_zero_capacity_disables_it(tmp_path):
    cache = ImageCache(tmp_path / "off", 0)
    cache.put("a", b"abc")
    assert cache.get("a") is None
    assert not (tmp_path / "off").exists()


def test_restart_adopts_entries_and_drops_leftovers(tmp_path):
    cache = ImageCache(tmp_path, 1000)
    cache.put("a", b"a" * 100)
    cache.put("b", b"b" * 100)
    cache.get("a")  # a is the most recent
    (tmp_path / ".tmp-crashed").write_bytes(b"partial")
    reopened = ImageCache(tmp_path, 1000)
    assert reopened.get("a") == b"a" * 100 and reopened.get("b") == b"b" * 100
    assert not (tmp_path / ".tmp-crashed").exists()
    os.utime(tmp_path / hashlib.sha256(b"a").hexdigest(), (2e9, 2e9))  # a is the most recent
    shrunk = ImageCache(tmp_path, 150)
    assert shrunk.get("b") is None and shrunk.get("a") == b"a" * 100
    assert disk_bytes(tmp_path) == 100


def test_damaged_or_removed_files_are_misses(tmp_path):
    cache = ImageCache(tmp_path, 1000)
    cache.put("a", b"a" * 100)
    (tmp_path / hashlib.sha256(b"a").hexdigest()).write_bytes(b"a" * 10)
    assert cache.get("a") is None
    assert cache.total_bytes == 0
    cache.put("b", b"b")
    (tmp_path / hashlib.sha256(b"b").hexdigest()).unlink()
    assert cache.get("b") is None and len(cache) == 0


def test_discard(tmp_path):
    cache = ImageCache(tmp_path, 1000)
    cache.put("a", b"abc")
    cache.discard("a")
    cache.discard("never-stored")
    assert cache.get("a") is None and disk_bytes(tmp_path) == 0


def test_concurrent_use_stays_consistent(tmp_path):
    cache = ImageCache(tmp_path, 20_000)
    errors = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                key = f"k{rng.randrange(40)}"
                if rng.random() < 0.5:
                    cache.put(key, key.encode() * rng.randrange(1, 200))
                else:
                    data = cache.get(key)
                    assert data is None or data == key.encode() * (len(data) // len(key))
                assert disk_bytes(tmp_path) <= 20_000 + 2000 * 8  # only in-flight temporary files beyond the cap
        except Exception as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert disk_bytes(tmp_path) == cache.total_bytes <= 20_000
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]
