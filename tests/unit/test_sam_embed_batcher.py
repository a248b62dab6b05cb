"""Dynamic batching of embeddings: batches form, interactive jobs go first, failures stay per image."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sam.embed_batcher import EmbedBatcher


class RecordingEngine:
    """embed = the image's first pixel value; records each call's image values in order."""

    def __init__(self, gate: threading.Event | None = None, bad_value: int | None = None):
        self.calls: list[list[int]] = []
        self.gate = gate
        self.bad_value = bad_value

    def embed(self, image):
        return self.embed_batch([image])[0]

    def embed_batch(self, images):
        values = [int(image[0, 0, 0]) for image in images]
        if self.gate is not None:
            self.gate.wait(5)
        self.calls.append(values)
        if self.bad_value in values:
            raise ValueError(f"cannot embed image {self.bad_value}")
        return [f"embedding-{value}" for value in values]


def image(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, dtype=np.uint8)


def submit_all(batcher, values, interactive=False):
    pool = ThreadPoolExecutor(len(values))
    futures = [pool.submit(batcher.embed, f"k{v}", image(v), interactive) for v in values]
    return pool, futures


def test_concurrent_first_clicks_share_one_encoder_call():
    engine = RecordingEngine()
    batcher = EmbedBatcher(engine, max_batch=4, wait_s=0.2)
    pool, futures = submit_all(batcher, [1, 2, 3, 4, 5, 6])
    assert sorted(f.result(5) for f in futures) == sorted(f"embedding-{v}" for v in range(1, 7))
    assert sorted(len(call) for call in engine.calls) == [2, 4]
    assert batcher.images_embedded == 6 and batcher.batches_run == 2
    pool.shutdown()
    batcher.close()


def test_a_lone_job_waits_at_most_the_batch_window():
    batcher = EmbedBatcher(RecordingEngine(), max_batch=8, wait_s=0.05)
    started = time.monotonic()
    assert batcher.embed("k9", image(9), interactive=True) == "embedding-9"
    assert time.monotonic() - started < 1.0
    batcher.close()


def test_interactive_first_clicks_go_before_queued_prewarm():
    gate = threading.Event()
    engine = RecordingEngine(gate=gate)
    batcher = EmbedBatcher(engine, max_batch=1, wait_s=0)
    pool = ThreadPoolExecutor(6)
    blocker = pool.submit(batcher.embed, "k0", image(0), False)  # occupies the worker until the gate opens
    time.sleep(0.1)
    prewarms = [pool.submit(batcher.embed, f"k{v}", image(v), False) for v in (1, 2, 3)]
    time.sleep(0.1)
    click = pool.submit(batcher.embed, "k7", image(7), True)
    time.sleep(0.1)
    gate.set()
    for future in [blocker, click, *prewarms]:
        future.result(5)
    assert [call[0] for call in engine.calls] == [0, 7, 1, 2, 3]
    pool.shutdown()
    batcher.close()


def test_a_prewarm_an_annotator_waits_for_is_promoted():
    gate = threading.Event()
    engine = RecordingEngine(gate=gate)
    batcher = EmbedBatcher(engine, max_batch=1, wait_s=0)
    pool = ThreadPoolExecutor(6)
    blocker = pool.submit(batcher.embed, "k0", image(0), False)
    time.sleep(0.1)
    prewarms = [pool.submit(batcher.embed, f"k{v}", image(v), False) for v in (1, 2, 3)]
    time.sleep(0.1)
    batcher.promote("k3")
    gate.set()
    for future in [blocker, *prewarms]:
        future.result(5)
    assert [call[0] for call in engine.calls] == [0, 3, 1, 2]
    pool.shutdown()
    batcher.close()


def test_one_bad_image_in_a_batch_fails_alone():
    engine = RecordingEngine(bad_value=2)
    batcher = EmbedBatcher(engine, max_batch=3, wait_s=0.2)
    pool, futures = submit_all(batcher, [1, 2, 3])
    results = {}
    for value, future in zip([1, 2, 3], futures, strict=True):
        try:
            results[value] = future.result(5)
        except ValueError as error:
            results[value] = str(error)
    assert results == {1: "embedding-1", 2: "cannot embed image 2", 3: "embedding-3"}
    pool.shutdown()
    batcher.close()


def test_an_engine_without_embed_batch_is_run_one_image_at_a_time():
    class Single:
        def embed(self, image):
            return int(image[0, 0, 0])

    batcher = EmbedBatcher(Single(), max_batch=8)
    assert batcher.max_batch == 1
    assert batcher.embed("k5", image(5), interactive=False) == 5
    batcher.close()


def test_a_closed_batcher_refuses_new_work():
    batcher = EmbedBatcher(RecordingEngine())
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.embed("k1", image(1), interactive=True)


def test_a_batch_never_mixes_first_clicks_with_prewarm():
    gate = threading.Event()
    engine = RecordingEngine(gate=gate)
    batcher = EmbedBatcher(engine, max_batch=4, wait_s=0)
    pool = ThreadPoolExecutor(6)
    blocker = pool.submit(batcher.embed, "k0", image(0), False)
    time.sleep(0.1)
    futures = [pool.submit(batcher.embed, f"k{v}", image(v), False) for v in (1, 2)]
    futures += [pool.submit(batcher.embed, f"k{v}", image(v), True) for v in (7, 8)]
    time.sleep(0.1)
    gate.set()
    for future in [blocker, *futures]:
        future.result(5)
    assert engine.calls == [[0], [7, 8], [1, 2]]
    pool.shutdown()
    batcher.close()
