"""The two-level embedding cache against a real redis-server: EmbeddingStores standing in for
replicas share embeddings and refinement logits through Redis, embed an image once between them,
treat hostile values as misses, and keep answering from their own memory while Redis is down."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from backends.metrics import Metrics
from backends.server.app import create_app
from backends.settings import Settings
from devstack.redis_server import RedisServer, redis_server_binary
from sam.embedding_codec import encode_embedding
from sam.embeddings import EmbeddingStore
from sam.engines.classic import ClassicEmbedding, ClassicEngine
from sam.model import SamBackend
from sam.prompts import Prompt
from tests.support.ci import unavailable

SIDE = 32


@dataclass
class _Image:
    pixels: np.ndarray
    width: int
    height: int


class _Images:
    """Stand-in for ImageFetcher: each URI is a different (SIDE x SIDE) image; counts loads."""

    def __init__(self) -> None:
        self.loads = 0

    @staticmethod
    def identity(uri, task_id):
        return f"{task_id}:{uri}"

    def load(self, uri, task_id=None):
        self.loads += 1
        seed = int.from_bytes(hashlib.sha256(uri.encode()).digest()[:4], "little")
        pixels = np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        return _Image(pixels, SIDE, SIDE)


class SlowClassicEngine(ClassicEngine):
    """The classic engine with an embedding that takes `seconds` (two replicas really overlap)."""

    def __init__(self, seconds: float = 0.3) -> None:
        self.seconds = seconds

    def embed(self, image):
        time.sleep(self.seconds)
        return super().embed(image)


def replica(url: str, engine=None, **settings) -> EmbeddingStore:
    """One replica's EmbeddingStore on the Redis at `url`."""
    options = dict(redis_url=url, embedding_cache_mb=8, redis_timeout_s=0.5)
    options.update(settings)
    return EmbeddingStore(engine or ClassicEngine(), Settings(**options), _Images(), Metrics())


def new_image() -> str:
    return f"http://images.test/{uuid.uuid4().hex}.png"  # a key no other test (or run) has used


def sources(store: EmbeddingStore) -> tuple[int, int, int]:
    counts = store.health()["embedding_sources"]
    return counts["l1_hits"], counts["l2_hits"], counts["recomputes"]


@pytest.fixture
def client(redis_server):
    return redis.Redis.from_url(redis_server.url)


def test_an_embedding_computed_on_one_replica_is_read_by_another(redis_server, client):
    first, second = replica(redis_server.url), replica(redis_server.url)
    uri = new_image()
    computed = first.get(uri, 1)
    assert sources(first) == (0, 0, 1)

    shared = second.get(uri, 1)
    assert sources(second) == (0, 1, 0)  # from Redis: no image fetched, no embed
    assert second._images.loads == 0
    assert (shared.width, shared.height) == (SIDE, SIDE)
    assert np.array_equal(shared.embedding.image, computed.embedding.image)
    second.get(uri, 1)
    assert sources(second) == (1, 1, 0)  # then from its own memory

    key = second.shared.embedding_key("1:" + uri)
    assert 0 < client.pttl(key) <= 86_400_000
    assert second.health()["shared_cache"]["state"] == "up"


def test_embeddings_expire_after_the_ttl(redis_server, client):
    first = replica(redis_server.url, sam_shared_cache_ttl_s=0.3)
    uri = new_image()
    first.get(uri, 1)
    key = first.shared.embedding_key("1:" + uri)
    assert client.exists(key)
    deadline = time.monotonic() + 5
    while client.exists(key) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not client.exists(key)
    later = replica(redis_server.url)
    later.get(uri, 1)
    assert sources(later) == (0, 0, 1)


@pytest.mark.parametrize(
    "hostile",
    [
        b"garbage",
        b"",
        "truncated",
        "other size",
        "oversized",
        "a list",
    ],
)
def test_a_hostile_value_in_redis_is_a_miss_and_a_warning(hostile, redis_server, client, caplog):
    store = replica(redis_server.url, embedding_cache_mb=1)
    uri = new_image()
    key = store.shared.embedding_key("1:" + uri)
    good = encode_embedding(ClassicEmbedding(np.zeros((SIDE, SIDE, 3), np.uint8)), SIDE, SIDE)
    if hostile == "truncated":
        client.set(key, good[:-7])
    elif hostile == "other size":  # well formed, but says the image is 16 pixels wide
        client.set(key, encode_embedding(ClassicEmbedding(np.zeros((SIDE, 16, 3), np.uint8)), SIDE, SIDE))
    elif hostile == "oversized":
        client.set(key, good + b"\0" * (2 << 20))  # above EMBEDDING_CACHE_MB: never downloaded
    elif hostile == "a list":
        client.rpush(key, b"x")
    else:
        client.set(key, hostile)
    with caplog.at_level(logging.WARNING):
        record = store.get(uri, 1)
    assert (record.width, record.height) == (SIDE, SIDE)
    assert sources(store) == (0, 0, 1)
    report = store.health()["shared_cache"]
    assert report["state"] == "up"
    if hostile != b"":  # an empty string is just absent
        said = "WRONGTYPE" if hostile == "a list" else "refused"
        assert report["errors"] == 1 and said in report["last_error"]
        assert any(said in message for message in caplog.messages)


def test_two_replicas_asked_for_one_image_at_once_embed_it_once(redis_server):
    first = replica(redis_server.url, SlowClassicEngine(0.4))
    second = replica(redis_server.url, SlowClassicEngine(0.4))
    uri = new_image()
    barrier = threading.Barrier(2)
    results = {}

    def click(name, store):
        barrier.wait()
        results[name] = store.get(uri, 1)

    threads = [threading.Thread(target=click, args=item) for item in (("a", first), ("b", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    recomputes = sources(first)[2] + sources(second)[2]
    l2_hits = sources(first)[1] + sources(second)[1]
    assert (recomputes, l2_hits) == (1, 1)
    assert first.shared.counts["waits"] + second.shared.counts["waits"] == 1
    assert np.array_equal(results["a"].embedding.image, results["b"].embedding.image)


def test_a_replica_waits_for_a_silent_lock_holder_at_most_the_locks_lifetime(redis_server, client):
    store = replica(redis_server.url, sam_shared_lock_ms=400)
    uri = new_image()
    client.set(store.shared.lock_key("1:" + uri), "someone-else", px=400)  # takes it, never publishes
    started = time.monotonic()
    store.get(uri, 1)
    waited = time.monotonic() - started
    assert sources(store) == (0, 0, 1)
    assert 0.3 < waited < 2.0


def test_a_click_refines_the_mask_another_replica_answered(redis_server, tmp_path):
    from sam.engines.segment_anything_engine import SamEngine, save_random_checkpoint

    checkpoint = save_random_checkpoint(tmp_path / "tiny.pth", "vit_tiny")
    engine = SamEngine(checkpoint=checkpoint, model_type="vit_tiny", device="cpu")
    options = dict(sam_model_type="vit_tiny", sam_checkpoint=str(checkpoint))
    first, second, alone = (replica(redis_server.url, engine, **options) for _ in range(3))
    uri = new_image()
    box = (4.0, 4.0, 28.0, 28.0)
    click1 = Prompt("Object", "image", box, ((16.0, 16.0),), (1,))
    click2 = Prompt("Object", "image", box, ((16.0, 16.0), (8.0, 9.0)), (1, 0))

    first.predict(first.get(uri, 7), click1)  # replica 1 answers the first click...
    record = second.get(uri, 7)
    stored = first.refinements.previous_logits(record.identity, click2)
    assert np.array_equal(second.refinements.previous_logits(record.identity, click2), stored)
    refined, _ = second.predict(record, click2)  # ...replica 2 the added click, refining that mask

    single = alone.get(uri, 7)  # one replica doing both clicks gives the same mask
    alone.predict(single, click1)
    expected, _ = alone.predict(single, click2)
    assert np.array_equal(refined, expected)
    assert sources(second)[2] == 0 and sources(alone)[2] == 0  # one embedding for all three


def test_a_correction_click_on_another_replica_finds_the_region_the_first_one_answered(redis_server, client):
    from sam.last_regions import LastRegions

    first, second = (LastRegions(shared=replica(redis_server.url).shared) for _ in range(2))
    image = new_image()
    box = Prompt("Nucleus", "image", (10.0, 10.0, 40.0, 40.0), ((20.0, 20.0),), (1,), "box")
    first.remember(image, box, "region-1")

    click = Prompt("Nucleus", "image", None, ((30.0, 31.0),), (0,), "point")
    found = second.refinement(image, click)
    assert found is not None and found.region_id == "region-1"
    assert found.prompt.box == box.box
    assert found.prompt.points == ((20.0, 20.0), (30.0, 31.0)) and found.prompt.point_labels == (1, 0)
    assert second.refinement(image, Prompt("Cell", "image", None, ((30.0, 31.0),), (0,))) is None  # other label


@pytest.mark.parametrize(
    "hostile",
    [b"not json", b"{}", b'[{"id": "r", "from": "", "box": [1, 2, 3], "points": [], "signs": []}]',
     b'[{"id": "r", "from": "", "box": [0, 0, 50, 50], "points": [[1, NaN]], "signs": [1]}]',
     b'[{"id": "r", "from": "", "box": [0, 0, 50, 50], "points": [[1, 2]], "signs": [7]}]'],
)  # fmt: skip
def test_hostile_answered_regions_in_redis_are_a_miss(hostile, redis_server, client):
    from sam.last_regions import LastRegions, _key

    store = replica(redis_server.url)
    regions = LastRegions(shared=store.shared)
    image = new_image()
    click = Prompt("Nucleus", "image", None, ((20.0, 20.0),), (0,))
    client.set(store.shared.regions_key(_key(image, click)), hostile)
    assert regions.refinement(image, click) is None
    assert "answered region" in store.health()["shared_cache"]["last_error"]


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, to stop and start (the session's stays up for others)."""
    if redis_server_binary() is None:
        unavailable("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(root=tmp_path / "redis", log_path=tmp_path / "redis.log").start()
    yield server
    server.stop()


def test_redis_down_falls_back_to_memory_warns_and_recovers(own_redis, caplog):
    store = replica(own_redis.url, redis_timeout_s=0.3)
    cached = new_image()
    store.get(cached, 1)
    own_redis.stop()

    with caplog.at_level(logging.WARNING):
        started = time.monotonic()
        store.get(cached, 1)  # from L1: Redis is not even asked
        assert time.monotonic() - started < 0.1
        store.get(new_image(), 2)  # computed here: the L2 lookup fails fast
        assert time.monotonic() - started < 2.0
        store.get(new_image(), 3)  # while down, Redis is skipped until the next probe
    report = store.health()
    assert report["status"] == "DEGRADED"
    assert report["shared_cache"]["state"] == "down" and "L1" in report["shared_cache"]["warning"]
    assert report["shared_cache"]["errors"] >= 1 and report["shared_cache"]["last_error"]
    assert sources(store) == (1, 0, 3)
    assert any("unreachable" in message for message in caplog.messages)

    own_redis.start()  # the same port
    deadline = time.monotonic() + 10
    while store.health()["shared_cache"]["state"] != "up" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.health()["shared_cache"]["state"] == "up"
    assert "status" not in store.health()
    uri = new_image()
    store.get(uri, 4)  # published again
    assert redis.Redis.from_url(own_redis.url).exists(store.shared.embedding_key("4:" + uri))


def test_health_and_metrics_report_the_shared_cache_without_the_password(own_redis, tmp_path, caplog):
    password = "s3cret-" + uuid.uuid4().hex[:8]
    redis.Redis.from_url(own_redis.url).config_set("requirepass", password)
    with_password = own_redis.url.replace("redis://", f"redis://:{password}@")
    wrong_password = own_redis.url.replace("redis://", f"redis://:{password}x@")
    reports = {}
    with caplog.at_level(logging.INFO):
        for name, url in (("right", with_password), ("wrong", wrong_password)):
            settings = Settings(sam_engine="classic", redis_url=url, image_cache_dir=tmp_path / "images")
            with TestClient(create_app(SamBackend, settings)) as http:
                reports[name] = http.get("/health").json(), http.get("/metrics").text
    health, metrics = reports["right"]
    assert health["status"] == "UP"
    assert health["shared_cache"]["state"] == "up" and health["shared_cache"]["url"] == own_redis.url
    assert health["shared_cache"]["eviction"] == {"maxmemory_bytes": 256 << 20, "maxmemory_policy": "allkeys-lru"}
    assert health["embedding_sources"] == {"l1_hits": 0, "l2_hits": 0, "recomputes": 0}
    assert "sam_shared_cache_up 1.0" in metrics
    assert 'sam_embedding_lookups_total{source="computed"} 0.0' in metrics

    health, metrics = reports["wrong"]
    assert health["status"] == "DEGRADED" and health["shared_cache"]["state"] == "down"
    assert "Authentication" in health["shared_cache"]["last_error"]
    assert "sam_shared_cache_up 0.0" in metrics and "sam_shared_cache_errors_total 1.0" in metrics
    for text in (str(reports), caplog.text):
        assert password not in text


def test_without_redis_url_nothing_changes_and_redis_is_not_needed(tmp_path):
    store = EmbeddingStore(ClassicEngine(), Settings(embedding_cache_mb=8), _Images(), Metrics())
    uri = new_image()
    store.get(uri, 1)
    store.get(uri, 1)
    assert store.shared is None
    assert store.health()["shared_cache"] == {"state": "off"}
    assert sources(store) == (1, 0, 1)


def test_without_redis_url_the_redis_client_is_not_even_imported():
    code = (
        "import sys\n"
        "from backends.metrics import Metrics\n"
        "from backends.settings import Settings\n"
        "from sam.embeddings import EmbeddingStore\n"
        "from sam.engines.classic import ClassicEngine\n"
        "EmbeddingStore(ClassicEngine(), Settings(), None, Metrics())\n"
        "print('redis' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"REDIS_URL": "http://user:hunter2@cache:6379"}, "REDIS_URL must start with"),
        ({"SAM_SHARED_CACHE_TTL_S": "0"}, "SAM_SHARED_CACHE_TTL_S"),
        ({"SAM_SHARED_CACHE_TTL_S": "nan"}, "SAM_SHARED_CACHE_TTL_S"),
        ({"SAM_SHARED_LOCK_MS": "50"}, "SAM_SHARED_LOCK_MS=50 must be at least 100"),
        ({"SAM_SHARED_LOCK_MS": "999999"}, "SAM_SHARED_LOCK_MS"),
        ({"REDIS_TIMEOUT_S": "0"}, "REDIS_TIMEOUT_S"),
    ],
)
def test_bad_shared_cache_settings_refuse_to_start_without_echoing_the_url(env, message):
    from backends.settings import SettingsError

    with pytest.raises(SettingsError, match=message) as refused:
        Settings.from_env(env)
    assert "hunter2" not in str(refused.value)
