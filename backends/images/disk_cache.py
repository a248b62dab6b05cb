"""A disk cache of fetched image bytes, bounded in bytes, least recently used evicted first.

Keys are stable image identities (task id + URI without signature parameters, see
`ImageFetcher.identity`); file names are the SHA-256 of the identity, so nothing from the URL
(tokens, paths) appears on disk. Writes are atomic (temporary file + `os.replace`), so a crash never
leaves a half-written image behind under a real name. The access order survives restarts through
the files' modification times (touched on every hit; atime is unreliable with noatime mounts).

One process owns a directory: two processes sharing it each keep their own byte count.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"


def cache_file_name(identity: str) -> str:
    """The file name an identity is stored under: 64 hex characters."""
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()


class ImageCache:
    """Thread-safe LRU cache of image bytes in `directory`, never holding more than `capacity_bytes`.

    `capacity_bytes <= 0` disables it: `get` always misses and `put` stores nothing.
    """

    def __init__(self, directory: Path, capacity_bytes: int):
        self.directory = Path(directory)
        self.capacity_bytes = max(int(capacity_bytes), 0)
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # file name -> bytes, least recent first
        self._total = 0
        self.hits = 0  # lookups served from disk
        self.misses = 0
        self.evictions = 0  # entries removed to stay under capacity_bytes
        if self.enabled and self.directory.is_dir():  # the directory itself is made on the first put
            self._load_index()

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    @property
    def total_bytes(self) -> int:
        return self._total

    def __len__(self) -> int:
        return len(self._sizes)

    def get(self, identity: str) -> bytes | None:
        """The bytes stored for `identity`, or None (and the entry counts as used most recently)."""
        if not self.enabled:
            return None
        name = cache_file_name(identity)
        with self._lock:
            size = self._sizes.get(name)
            if size is None:
                self.misses += 1
                return None
            self._sizes.move_to_end(name)
        path = self.directory / name
        try:
            data = path.read_bytes()
            os.utime(path)
        except OSError:
            data = None
        with self._lock:
            if data is None or len(data) != size:  # removed or damaged behind our back
                if name in self._sizes:
                    self._forget_locked(name)
                self.misses += 1
                return None
            self.hits += 1
        return data

    def put(self, identity: str, data: bytes) -> None:
        """Store `data` under `identity`, evicting least recently used entries to stay under capacity.
        Items larger than the whole capacity are not stored."""
        if not self.enabled or len(data) > self.capacity_bytes:
            return
        name = cache_file_name(identity)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.directory)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            log.warning("image cache: could not write to %s: %s", self.directory, exc)
            return
        with self._lock:
            if name in self._sizes:
                self._forget_locked(name, delete=False)
            # Make room before the new file lands, so the total on disk never exceeds the capacity.
            while self._sizes and self._total + len(data) > self.capacity_bytes:
                oldest = next(iter(self._sizes))
                self._forget_locked(oldest)
                self.evictions += 1
            try:
                os.replace(tmp, self.directory / name)
            except OSError as exc:
                log.warning("image cache: could not store an entry: %s", exc)
                _unlink(Path(tmp))
                return
            self._sizes[name] = len(data)
            self._total += len(data)

    def discard(self, identity: str) -> None:
        """Remove `identity` (e.g. bytes that turned out not to decode)."""
        name = cache_file_name(identity)
        with self._lock:
            if name in self._sizes:
                self._forget_locked(name)

    def clear(self) -> None:
        with self._lock:
            for name in list(self._sizes):
                self._forget_locked(name)

    def _forget_locked(self, name: str, delete: bool = True) -> None:
        self._total -= self._sizes.pop(name)
        if delete:
            _unlink(self.directory / name)

    def _load_index(self) -> None:
        """Adopt entries left by an earlier run (oldest access first); drop stray temporary files
        and whatever exceeds a capacity that may have shrunk since."""
        entries = []
        for path in self.directory.iterdir():
            if path.name.startswith(_TMP_PREFIX):
                _unlink(path)
                continue
            if len(path.name) != 64 or not path.is_file():
                continue
            stat = path.stat()
            entries.append((stat.st_mtime, path.name, stat.st_size))
        for _, name, size in sorted(entries):
            self._sizes[name] = size
            self._total += size
        while self._total > self.capacity_bytes:
            self._forget_locked(next(iter(self._sizes)))


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
