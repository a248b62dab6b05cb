"""Dynamic batching of image embeddings: many images, one encoder call.

Prewarm jobs (Label Studio opening tasks, TASKS_CREATED) and concurrent annotators' first clicks
queue here; one worker thread takes up to `max_batch` of them, waiting at most `wait_s` after the
first arrives for more to join, and runs the engine's `embed_batch` once (on a GPU a batch of 8
costs about 0.6x per image what single images do). Interactive jobs go before prewarm jobs, and a
prewarm job that an annotator starts waiting for is promoted. Clicks on images already embedded
never come here: they read the embedding cache and go straight to the decoder.

Memory: at most `max_batch` decoded images (the queue holds their pixels) plus one batch of
encoder activations are alive beyond the embedding cache's cap; `max_batch` = 1 turns batching off.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INTERACTIVE, PREWARM = 0, 1


@dataclass(order=True)
class _Job:
    priority: int
    order: int
    key: str = field(compare=False)
    pixels: np.ndarray = field(compare=False, repr=False)
    future: Future = field(compare=False, repr=False)


class EmbedBatcher:
    """Queues embeddings and runs them in batches on one worker thread.

    `engine`: has `embed(image)`, and optionally `embed_batch(images) -> list` (else batches are
    run one image at a time). `engine_lock`: held around every engine call (the store's embed lock).
    """

    def __init__(
        self,
        engine: Any,
        max_batch: int = 1,
        wait_s: float = 0.005,
        engine_lock: AbstractContextManager | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch = max(1, int(max_batch)) if hasattr(engine, "embed_batch") else 1
        self.wait_s = max(0.0, float(wait_s))
        self._engine_lock = engine_lock if engine_lock is not None else nullcontext()
        self._queue: list[_Job] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self.batches_run = 0
        self.images_embedded = 0
        self._worker = threading.Thread(target=self._run, name="embed-batcher", daemon=True)
        self._worker.start()

    def embed(self, key: str, pixels: np.ndarray, interactive: bool) -> Any:
        """Queue `pixels` (HxWx3 uint8) under `key` and wait for its embedding."""
        future: Future = Future()
        job = _Job(INTERACTIVE if interactive else PREWARM, next(self._order), key, pixels, future)
        with self._cond:
            if self._closed:
                raise RuntimeError("the embedding batcher is closed")
            self._queue.append(job)
            self._cond.notify()
        return future.result()

    def promote(self, key: str) -> None:
        """An annotator now waits for `key`: move its queued prewarm job ahead of other prewarms."""
        with self._cond:
            for job in self._queue:
                if job.key == key and job.priority != INTERACTIVE:
                    job.priority = INTERACTIVE

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=5)

    # -- worker ---------------------------------------------------------------------------------

    def _next_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed and not self._queue:
                return None
            deadline = time.monotonic() + self.wait_s
            while len(self._queue) < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._queue.sort()
            # a batch holds one priority: a first click never waits for prewarm images to encode
            size = 0
            while (
                size < min(self.max_batch, len(self._queue)) and self._queue[size].priority == self._queue[0].priority
            ):
                size += 1
            batch, self._queue = self._queue[:size], self._queue[size:]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._embed(batch)

    def _embed(self, batch: list[_Job]) -> None:
        if len(batch) > 1:
            try:
                with self._engine_lock:
                    embeddings = self.engine.embed_batch([job.pixels for job in batch])
                if len(embeddings) != len(batch):  # checked before any future is resolved
                    raise RuntimeError(f"embed_batch returned {len(embeddings)} embeddings for {len(batch)} images")
                self._count(len(batch))
                for job, embedding in zip(batch, embeddings, strict=True):
                    job.future.set_result(embedding)
                return
            except Exception as error:  # one bad image must not fail the others: retry one by one
                log.warning("a batch of %d embeddings failed (%s); embedding them one at a time", len(batch), error)
        for job in batch:
            try:
                with self._engine_lock:
                    embedding = self.engine.embed(job.pixels)
                self._count(1)
                job.future.set_result(embedding)
            except BaseException as error:  # handed to the waiting caller, never lost
                job.future.set_exception(error)

    def _count(self, images: int) -> None:
        self.batches_run += 1
        self.images_embedded += images
