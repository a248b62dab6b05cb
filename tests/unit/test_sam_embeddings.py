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
from backends.model_base import BackendContext
from backends.settings import Settings
from sam.embeddings import EmbeddingStore


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
    context = BackendContext(
        settings=Settings(embedding_cache_mb=1),
        images=_Images(),
        metrics=Metrics(),
        background=concurrent.futures.ThreadPoolExecutor(2),
    )
    return EmbeddingStore(engine, context)


@pytest.mark.parametrize("independent", [True, False])
def test_click_and_embedding_locking(independent):
    engine = _SlowEmbedEngine(independent)
    store = _store(engine)
    ready = store.get("2", task_id=2)  # image 2 is embedded and cached
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(store.get, "1", 1)  # image 1: a long embedding in progress
        assert engine.embedding_started.wait(5)
        click = threading.Thread(target=store.predict, args=(ready, [0, 0, 4, 4], None, None))
        started = time.monotonic()
        click.start()
        click.join(1.0)
        finished_during_embedding = not click.is_alive()
        engine.release.set()
        click.join(5)
        slow.result(5)
    assert finished_during_embedding is independent
    assert time.monotonic() - started < 5
