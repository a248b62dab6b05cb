"""Image embeddings for one engine: a byte-capped LRU keyed by stable image identity, single-flight.

Engine calls are serialised: `embed` calls under one lock, `predict` calls under another, so a
click on an embedded image need not wait behind another image's (seconds-long) embedding. That is
safe for the built-in engines, which keep no state between the two; a custom engine shares one
lock for both unless it declares `independent_embed = True`. The key is `ImageFetcher.identity(uri,
task_id)` (task id + URI without signature parameters), known before the image is fetched: a
cached click costs no download and no decode.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from sam.embedding_cache import ByteLRU
from backends.server.model_base import BackendContext
from backends.images.pixel_budget import holding_image
from sam.embed_batcher import EmbedBatcher
from sam.engines import embedding_nbytes


@dataclass(frozen=True)
class ImageEmbedding:
    """An engine's embedding of one image and that image's size in pixels."""

    embedding: Any
    width: int
    height: int


class EmbeddingStore:
    """The engine, its lock and its embedding cache (EMBEDDING_CACHE_MB), shared by all projects."""

    def __init__(self, engine: Any, context: BackendContext):
        self.engine = engine
        self._context = context
        self._embed_lock = threading.Lock()
        independent = bool(getattr(engine, "independent_embed", False))
        self._predict_lock = threading.Lock() if independent else self._embed_lock
        self.cache: ByteLRU[str, ImageEmbedding] = ByteLRU(
            int(context.settings.embedding_cache_mb * 1024 * 1024),
            sizeof=lambda record: embedding_nbytes(engine, record.embedding),
            name="embeddings",
            metrics=context.metrics,
        )
        self.batcher = EmbedBatcher(
            engine,
            max_batch=embed_batch_size(context.settings.embed_batch, str(getattr(engine, "device", "cpu"))),
            wait_s=context.settings.embed_batch_wait_ms / 1000.0,
            engine_lock=self._embed_lock,
        )

    def get(self, uri: str, task_id: int | None, interactive: bool = True) -> ImageEmbedding:
        """The embedding of the task's image: cached, or fetched and computed once (concurrent callers
        wait). `interactive` (an annotator waits) jobs are embedded before prewarm jobs."""
        identity = self._context.images.identity(uri, task_id)
        if interactive:
            self.batcher.promote(identity)
        return self.cache.get_or_compute(identity, lambda: self._compute(uri, task_id, identity, interactive))

    def predict(
        self,
        record: ImageEmbedding,
        box: Sequence[float] | None,
        points: Sequence[Sequence[float]] | None,
        point_labels: Sequence[int] | None,
    ) -> tuple[np.ndarray, float]:
        """One prompt -> (HxW bool mask, score), checked against the image size."""
        with self._predict_lock:
            mask, score = self.engine.predict(
                record.embedding, box=box, points=points or None, point_labels=point_labels or None
            )
        mask = np.asarray(mask).astype(bool, copy=False)
        if mask.shape != (record.height, record.width):
            raise RuntimeError(
                f"engine {self.engine.name} returned a {mask.shape} mask for a {record.height}x{record.width} image"
            )
        return mask, float(score)

    def health(self) -> dict:
        return {
            "engine": self.engine.name,
            "device": str(getattr(self.engine, "device", "cpu")),
            "embedding_cache": {
                "bytes": self.cache.bytes,
                "entries": len(self.cache),
                "capacity_bytes": self.cache.capacity_bytes,
            },
        }

    def _compute(self, uri: str, task_id: int | None, identity: str, interactive: bool) -> ImageEmbedding:
        # The pixels count against the decode budget until embedded: images waiting for the engine
        # are what fills memory when many annotators open large images at once.
        with holding_image(self._context.images, uri, task_id) as image:
            embedding = self.batcher.embed(identity, image.pixels, interactive)
            return ImageEmbedding(embedding, width=image.width, height=image.height)


def embed_batch_size(setting: int, device: str) -> int:
    """EMBED_BATCH: a positive number as given; 0 (auto) is 8 on a GPU and 1 on a CPU, where the
    encoder is compute-bound and a batch only makes the first image wait for the others."""
    if setting > 0:
        return setting
    return 8 if device.startswith("cuda") else 1
