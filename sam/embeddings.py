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
from typing import Any

import numpy as np

from backends.errors import BadRequest
from backends.images.pixel_budget import holding_image
from backends.metrics import Metrics
from backends.settings import Settings
from sam.embed_batcher import EmbedBatcher
from sam.embedding_cache import ByteLRU
from sam.engines import embedding_nbytes
from sam.prompts import Prompt
from sam.refinement import Refinement, RefinementMemory, is_refinement_key


@dataclass(frozen=True)
class ImageEmbedding:
    """An engine's embedding of one image, that image's size in pixels and its cache identity."""

    embedding: Any
    width: int
    height: int
    identity: str = ""


class EmbeddingStore:
    """The engine, its lock and its embedding cache (EMBEDDING_CACHE_MB), shared by all projects.

    `images`: the server's image fetcher (`identity`, `loaded`); `metrics`: where the cache reports.
    """

    def __init__(self, engine: Any, settings: Settings, images: Any, metrics: Metrics):
        self.engine = engine
        self._images = images
        self._embed_lock = threading.Lock()
        independent = bool(getattr(engine, "independent_embed", False))
        self._predict_lock = threading.Lock() if independent else self._embed_lock
        # Embeddings and refinement logits share one byte cap (EMBEDDING_CACHE_MB) and one LRU.
        self.cache: ByteLRU[str, Any] = ByteLRU(
            int(settings.embedding_cache_mb * 1024 * 1024),
            sizeof=lambda value: (
                value.nbytes if isinstance(value, Refinement) else embedding_nbytes(engine, value.embedding)
            ),
            name="embeddings",
            metrics=metrics,
        )
        self.refinements = RefinementMemory(self.cache)
        self.refines = bool(getattr(engine, "supports_mask_input", False))
        self.batcher = EmbedBatcher(
            engine,
            max_batch=embed_batch_size(settings.embed_batch, str(getattr(engine, "device", "cpu"))),
            wait_s=settings.embed_batch_wait_ms / 1000.0,
            engine_lock=self._embed_lock,
        )

    def get(self, uri: str, task_id: int | None, interactive: bool = True) -> ImageEmbedding:
        """The embedding of the task's image: cached, or fetched and computed once (concurrent callers
        wait). `interactive` (an annotator waits) jobs are embedded before prewarm jobs."""
        identity = self._images.identity(uri, task_id)
        if interactive:
            self.batcher.promote(identity)
        return self.cache.get_or_compute(identity, lambda: self._compute(uri, task_id, identity, interactive))

    def predict(self, record: ImageEmbedding, prompt: Prompt) -> tuple[np.ndarray, float]:
        """One prompt -> (HxW bool mask, score), checked against the image size.

        With an engine that takes `mask_input`, a prompt that adds clicks to a region answered
        before is decoded with that region's previous logits (see sam.refinement).
        """
        points, labels = prompt.points or None, prompt.point_labels or None
        with self._predict_lock:
            if self.refines:
                previous = self.refinements.previous_logits(record.identity, prompt)
                prediction = self.engine.predict_with_logits(
                    record.embedding, prompt.box, points, labels, mask_input=previous
                )
                mask, score = prediction.mask, prediction.score
            else:
                mask, score = self.engine.predict(record.embedding, box=prompt.box, points=points, point_labels=labels)
        if self.refines:
            self.refinements.remember(record.identity, prompt, prediction.logits)
        return self._checked(record, mask), float(score)

    def segment_text(self, record: ImageEmbedding, text: str, threshold: float, max_instances: int) -> list:
        """Every instance of the concept `text` -> [(HxW bool mask, score), ...], best first."""
        if not getattr(self.engine, "supports_text", False):
            raise BadRequest(
                f"engine {self.engine.name} has no text prompts: use SAM_ENGINE=sam3 with the full "
                "facebook/sam3 checkpoint (its concept detector)"
            )
        with self._predict_lock:
            found = self.engine.segment_text(
                record.embedding, text, score_threshold=threshold, max_instances=max_instances
            )
        return [(self._checked(record, mask), float(score)) for mask, score in found]

    def _checked(self, record: ImageEmbedding, mask: Any) -> np.ndarray:
        mask = np.asarray(mask).astype(bool, copy=False)
        if mask.shape != (record.height, record.width):
            raise RuntimeError(
                f"engine {self.engine.name} returned a {mask.shape} mask for a {record.height}x{record.width} image"
            )
        return mask

    def health(self) -> dict:
        refinements = sum(1 for key in self.cache.keys() if is_refinement_key(key))  # noqa: SIM118  ByteLRU is no dict: keys() is a snapshot taken under its lock
        return {
            "engine": self.engine.name,
            "device": str(getattr(self.engine, "device", "cpu")),
            "embedding_cache": {
                "bytes": self.cache.bytes,
                "entries": len(self.cache) - refinements,
                "refinements": refinements,
                "capacity_bytes": self.cache.capacity_bytes,
            },
        }

    def _compute(self, uri: str, task_id: int | None, identity: str, interactive: bool) -> ImageEmbedding:
        # The pixels count against the decode budget until embedded: images waiting for the engine
        # are what fills memory when many annotators open large images at once.
        with holding_image(self._images, uri, task_id) as image:
            embedding = self.batcher.embed(identity, image.pixels, interactive)
            return ImageEmbedding(embedding, width=image.width, height=image.height, identity=identity)


def embed_batch_size(setting: int, device: str) -> int:
    """EMBED_BATCH: a positive number as given; 0 (auto) is 8 on a GPU and 1 on a CPU, where the
    encoder is compute-bound and a batch only makes the first image wait for the others."""
    if setting > 0:
        return setting
    return 8 if device.startswith("cuda") else 1
