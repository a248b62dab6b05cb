"""The shared embedding cache (L2): Redis behind every replica's in-process LRU (L1).

With REDIS_URL set, an image embedding computed by any replica (a prewarm or a first click) is
written to Redis, and a replica that misses its L1 reads it from there instead of running the
encoder. Across replicas an image is embedded once: the replica that finds no value takes a short
lock (`SET lock NX PX SAM_SHARED_LOCK_MS`); the others poll for the value until it is published or
the lock is gone (the holder died or gave up), at most the lock's lifetime, then compute it
themselves. Refinement logits (see sam.refinement) are kept here too, so a click on one replica
refines the mask another replica answered.

Keys, namespaced by the model so replicas of different engines or checkpoints never mix::

    sam:v1:<model>:emb:{<sha256 of the image identity>}     the embedding (TTL SAM_SHARED_CACHE_TTL_S)
    sam:v1:<model>:lock:{<same>}                            who is computing it (PX SAM_SHARED_LOCK_MS)
    sam:v1:<model>:ref:{<sha256 of the region key>}         a region's last logits (TTL <= 1 hour)

The `{...}` hash tags keep a value and its lock in one Redis Cluster slot (read together, released
by a script).
The byte budget is Redis's own: `maxmemory` with `maxmemory-policy allkeys-lru` evicts the least
recently used values; a value larger than EMBEDDING_CACHE_MB is never stored or read. Every failure
(Redis down, slow, or a value that does not decode) is a miss: the caller computes as without Redis.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from backends.metrics import Metrics
from backends.settings import Settings
from sam.embedding_codec import BadValue
from sam.redis_link import RedisLink

log = logging.getLogger(__name__)

T = TypeVar("T")

KEY_PREFIX = "sam:v1"
REFINEMENT_TTL_S = 3600.0  # an annotator's clicks on one region come within minutes
POLL_FIRST_S, POLL_MAX_S = 0.02, 0.2  # how often a waiting replica looks for the value

# delete the lock only if it is still ours (it may have expired and been taken by another replica)
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def open_shared_embeddings(
    settings: Settings, engine: Any, kind: str | None, metrics: Metrics
) -> SharedEmbeddings | None:
    """The L2 cache REDIS_URL names for `engine` (whose embeddings are of `kind`, see
    sam.embedding_codec), or None: REDIS_URL unset, or an engine whose embeddings we cannot rebuild.
    A Redis that does not answer yet is no error: the replica starts on L1 and connects later."""
    if not settings.redis_url:
        return None
    if kind is None:
        log.warning(
            "REDIS_URL is set, but embeddings of the %s engine cannot be shared (only the built-in engines' can): "
            "this replica caches in its own memory only",
            engine.name,
        )
        return None
    errors = metrics.counter("sam_shared_cache_errors", "Redis calls that failed and values refused")
    link = RedisLink(settings.redis_url, settings.redis_timeout_s, on_error=errors.inc)
    metrics.gauge("sam_shared_cache_up", "1 while the Redis shared cache answers").set_function(
        lambda: 1.0 if link.up else 0.0
    )
    namespace = model_namespace(
        engine.name,
        kind,
        settings.sam_model_type,
        Path(settings.sam_checkpoint).name,
        bool(getattr(engine, "supports_text", False)),
    )
    shared = SharedEmbeddings(
        link,
        namespace,
        ttl_s=settings.sam_shared_cache_ttl_s,
        lock_ms=settings.sam_shared_lock_ms,
        max_value_bytes=int(settings.embedding_cache_mb * 1024 * 1024),
    )
    if link.ping():
        shared.eviction = eviction_policy(link)
        log.info("shared embedding cache: Redis at %s, namespace %s, %s", link.url, namespace, shared.eviction)
    return shared


def eviction_policy(link: RedisLink) -> dict:
    """Redis's maxmemory and maxmemory-policy, with a warning when values would not be evicted;
    {} where CONFIG is not allowed (managed Redis services often refuse it)."""
    try:
        config = {_text(name): _text(value) for name, value in link.client.config_get("maxmemory*").items()}
        maxmemory, policy = int(config.get("maxmemory", "0")), config.get("maxmemory-policy", "")
    except Exception:  # noqa: BLE001 - an informational check only
        return {}
    report: dict[str, Any] = {"maxmemory_bytes": maxmemory, "maxmemory_policy": policy}
    if maxmemory == 0 or not policy.startswith(("allkeys-", "volatile-")):
        report["warning"] = (
            "Redis has no maxmemory or a policy that evicts nothing: set maxmemory and "
            "maxmemory-policy allkeys-lru, or writes fail once it is full"
        )
        log.warning("shared embedding cache: %s", report["warning"])
    return report


def model_namespace(*identity: object) -> str:
    """A short stable name for the model that makes the embeddings (engine, checkpoint, options)."""
    return hashlib.sha256("|".join(str(part) for part in identity).encode()).hexdigest()[:16]


class SharedEmbeddings:
    """Embeddings and refinement logits in Redis for one model namespace.

    `link`: the Redis connection; `ttl_s`: embeddings' time to live; `lock_ms`: the single-flight
    lock's lifetime (and the longest a replica waits for another's embedding); `max_value_bytes`:
    values above it are neither written nor read.
    """

    def __init__(
        self,
        link: RedisLink,
        namespace: str,
        ttl_s: float,
        lock_ms: int,
        max_value_bytes: int,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.link = link
        self.namespace = namespace
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.lock_ms = int(lock_ms)
        self.max_value_bytes = int(max_value_bytes)
        self._sleep, self._clock = sleep, clock
        self._release_script = link.client.register_script(_RELEASE)
        # embedding lookups: found in Redis (also after waiting), not found; waits: for another replica
        self.counts = {"hits": 0, "misses": 0, "waits": 0}
        self.eviction: dict = {}  # Redis's maxmemory settings, as far as CONFIG GET tells
        self._counts_lock = threading.Lock()

    # -- embeddings ---------------------------------------------------------------------------------

    def get_or_compute(
        self, identity: str, decode: Callable[[bytes], T], compute: Callable[[], tuple[T, bytes | None]]
    ) -> tuple[T, str]:
        """The embedding of image `identity` -> (value, "l2") when found in Redis (also after waiting
        for the replica computing it), else (value, "computed") from `compute()`, which returns the
        value and the bytes to publish (None: nothing to publish)."""
        key, lock = self.embedding_key(identity), self.lock_key(identity)
        token: str | None = None
        found = self._fetch(key, decode)
        if found is None:
            token = self._acquire(lock)
            if token is None:  # another replica is computing it
                self._count("waits")
                found = self._await(key, lock, decode)
        if found is not None:
            self._count("hits")
            return found, "l2"
        self._count("misses")
        if token is None:
            token = self._acquire(lock) or ""  # it gave up or is too slow: compute here (locked if we can)
        try:
            value, blob = compute()
            if blob is not None:
                self._store(key, blob, self.ttl_ms)
        finally:
            if token:
                self.link.call(lambda client: self._release_script(keys=[lock], args=[token]), 0, "lock release")
        return value, "computed"

    def embedding_key(self, identity: str) -> str:
        return self._key("emb", _digest(identity))

    def lock_key(self, identity: str) -> str:
        return self._key("lock", _digest(identity))

    # -- refinement logits ----------------------------------------------------------------------------

    def load_refinement(self, region: str, decode: Callable[[bytes], T]) -> T | None:
        return self._fetch(self._key("ref", _digest(region)), decode)

    def store_refinement(self, region: str, blob: bytes) -> None:
        ttl_ms = min(self.ttl_ms, int(REFINEMENT_TTL_S * 1000))
        self._store(self._key("ref", _digest(region)), blob, ttl_ms)

    # -- answered regions (sam.last_regions) --------------------------------------------------------

    def regions_key(self, key: str) -> str:
        return self._key("regions", _digest(key))

    def load_regions(self, key: str, decode: Callable[[bytes], T]) -> T | None:
        return self._fetch(self.regions_key(key), decode)

    def store_regions(self, key: str, blob: bytes) -> None:
        self._store(self.regions_key(key), blob, min(self.ttl_ms, int(REFINEMENT_TTL_S * 1000)))

    # -- report -----------------------------------------------------------------------------------------

    def health(self) -> dict:
        self.link.ping()  # /health is current even on a replica nobody clicks (no network while backing off)
        report = self.link.health()
        with self._counts_lock:
            report.update(namespace=self.namespace, **self.counts)
        if self.eviction:
            report["eviction"] = self.eviction
        if report["state"] == "down":
            report["warning"] = (
                "Redis is unreachable: this replica answers from its own memory (L1) only and recomputes "
                "embeddings other replicas have; it reconnects by itself"
            )
        return report

    # -- Redis calls (each one a miss or a no-op when Redis is down) ------------------------------------

    def _key(self, kind: str, digest: str) -> str:
        return f"{KEY_PREFIX}:{self.namespace}:{kind}:{{{digest}}}"

    def _count(self, name: str) -> None:
        with self._counts_lock:
            self.counts[name] += 1

    def _fetch(self, key: str, decode: Callable[[bytes], T]) -> T | None:
        """The decoded value under `key`, or None (absent, refused, Redis down)."""
        found = self._raw_fetch(key, None)
        return None if found is None else self._decoded(key, found, decode)

    def _decoded(self, key: str, found: list, decode: Callable[[bytes], T]) -> T | None:
        if found[0] != b"value":
            return None
        try:
            return decode(found[1])
        except BadValue as refused:
            self.link.note_bad_value(f"{key}: {refused}")
            return None

    def _raw_fetch(self, key: str, lock: str | None) -> list | None:
        """[b"value", bytes] | [b"absent", whether `lock` exists] | [b"unusable", 0]; None when Redis
        fails. GETRANGE, not GET: a value above max_value_bytes is refused after max + 1 bytes, not
        downloaded whole (a key of another type is an error Redis answers: counted, a miss)."""

        def fetch(client: Any) -> list:
            pipeline = client.pipeline(transaction=False)
            pipeline.getrange(key, 0, self.max_value_bytes)
            if lock is not None:
                pipeline.exists(lock)
            return pipeline.execute()

        replies = self.link.call(fetch, None, "fetch")
        if not replies:
            return None
        value = replies[0]
        if len(value) > self.max_value_bytes:
            self.link.note_bad_value(f"{key} holds more than {self.max_value_bytes} bytes")
            return [b"unusable", 0]
        if value:
            return [b"value", value]
        return [b"absent", int(replies[1]) if lock is not None else 0]

    def _store(self, key: str, blob: bytes, ttl_ms: int) -> None:
        if len(blob) > self.max_value_bytes:
            log.debug("%s: %d bytes, above the shared cache's %d: not stored", key, len(blob), self.max_value_bytes)
            return
        self.link.call(lambda client: client.set(key, blob, px=ttl_ms), None, "store")

    def _acquire(self, lock: str) -> str | None:
        """A token when this replica now holds `lock`, "" when Redis is down (compute unlocked),
        None when another replica holds it."""
        token = secrets.token_hex(8)
        acquired = self.link.call(lambda client: client.set(lock, token, nx=True, px=self.lock_ms), "", "lock")
        if acquired == "":  # the default: Redis is down
            return ""
        return token if acquired else None

    def _await(self, key: str, lock: str, decode: Callable[[bytes], T]) -> T | None:
        """Poll until the value is published (decoded), or None once the lock is gone, Redis fails,
        or the lock's lifetime has passed."""
        deadline = self._clock() + self.lock_ms / 1000.0
        pause = POLL_FIRST_S
        while self._clock() < deadline:
            self._sleep(pause)
            pause = min(pause * 2, POLL_MAX_S)
            found = self._raw_fetch(key, lock)
            if found is None:
                return None
            if found[0] == b"value":
                return self._decoded(key, found, decode)
            if found[0] != b"absent" or not found[1]:
                return None  # the holder is gone without publishing, or the value is unusable
        return None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
