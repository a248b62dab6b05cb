"""EmbeddingStore locking: a click never waits behind another image's embedding when the engine
says embed and predict are independent, and always does (one lock) when it does not."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from backends.metrics import Metrics
from backends.settings import Settings
from sam.embeddings import EmbeddingStore
from sam.prompts import Prompt


@dataclass
class _Image:
    pixels: np.ndarray
    width: int
    height: int


class _Images:
    """Stand-in for ImageFetcher: the URI names the image's fill value."""

    @staticmethod
    def identity(uri, task_id):
        return f"{task_id}:{uri}"

    def load(self, uri, task_id=None):
        return _Image(np.full((8, 8, 3), int(uri), np.uint8), 8, 8)


class _SlowEmbedEngine:
    """embed() of image 1 blocks until released; predict() is instant."""

    name = "slow-embed"

    def __init__(self, independent: bool):
        self.independent_embed = independent
        self.release = threading.Event()
        self.embedding_started = threading.Event()

    def embed(self, image):
        if image[0, 0, 0] == 1:
            self.embedding_started.set()
            self.release.wait(10)
        return image[..., 0].copy()

    def predict(self, embedding, box=None, points=None, point_labels=None):
        return embedding > 0, 1.0


def _store(engine):
    return EmbeddingStore(engine, Settings(embedding_cache_mb=1), _Images(), Metrics())


@pytest.mark.parametrize("independent", [True, False])
def test_click_and_embedding_locking(independent):
    engine = _SlowEmbedEngine(independent)
    store = _store(engine)
    ready = store.get("2", task_id=2)  # image 2 is embedded and cached
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(store.get, "1", 1)  # image 1: a long embedding in progress
        assert engine.embedding_started.wait(5)
        click = threading.Thread(target=store.predict, args=(ready, Prompt("Cell", "image", (0, 0, 4, 4))))
        started = time.monotonic()
        click.start()
        click.join(1.0)
        finished_during_embedding = not click.is_alive()
        engine.release.set()
        click.join(5)
        slow.result(5)
    assert finished_during_embedding is independent
    assert time.monotonic() - started < 5


class _BatchingEngine:
    """Records the size of every encoder call; embeddings are the images' first channel."""

    name = "batching"
    independent_embed = True
    device = "cpu"

    def __init__(self):
        self.batch_sizes: list[int] = []

    def embed(self, image):
        return self.embed_batch([image])[0]

    def embed_batch(self, images):
        time.sleep(0.05)
        self.batch_sizes.append(len(images))
        return [image[..., 0].copy() for image in images]

    def predict(self, embedding, box=None, points=None, point_labels=None):
        return embedding > 0, 1.0


def test_a_prewarm_burst_is_embedded_in_batches_of_embed_batch():
    engine = _BatchingEngine()
    settings = Settings(embedding_cache_mb=1, embed_batch=4, embed_batch_wait_ms=200)
    store = EmbeddingStore(engine, settings, _Images(), Metrics())
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        records = list(pool.map(lambda n: store.get(str(n), n, interactive=False), range(1, 9)))
    assert [int(record.embedding[0, 0]) for record in records] == list(range(1, 9))
    assert sum(engine.batch_sizes) == 8 and max(engine.batch_sizes) == 4 and len(engine.batch_sizes) <= 4


def test_embed_batch_auto_is_one_on_cpu_and_eight_on_a_gpu():
    from sam.embeddings import embed_batch_size

    assert embed_batch_size(0, "cpu") == 1
    assert embed_batch_size(0, "cuda:0") == 8
    assert embed_batch_size(3, "cpu") == 3
