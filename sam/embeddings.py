"""Image embeddings for one engine: a byte-capped LRU keyed by stable image identity, single-flight.

Engine calls are serialised: `embed` calls under one lock, `predict` calls under another, so a
click on an embedded image need not wait behind another image's (seconds-long) embedding. That is
safe for the built-in engines, which keep no state between the two; a custom engine shares one
lock for both unless it declares `independent_embed = True`. The key is `ImageFetcher.identity(uri,
task_id)` (task id + URI without signature parameters), known before the image is fetched: a
cached click costs no download and no decode.

With REDIS_URL the in-process cache (L1) sits in front of Redis (L2, sam.shared_embeddings): an L1
miss reads the embedding another replica computed before running the encoder, and what this
replica computes is published there. Each lookup is counted by where it was answered
(`embedding_sources` in /health, `sam_embedding_lookups_total{source}` in /metrics): l1, l2, or
computed (an engine embed call).
"""

from __future__ import annotations

import logging
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
from sam.embedding_codec import decode_embedding, encode_embedding, engine_kind
from sam.engines import embedding_nbytes
from sam.prompts import Prompt
from sam.refinement import Refinement, RefinementMemory, is_refinement_key
from sam.shared_embeddings import SharedEmbeddings, open_shared_embeddings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageEmbedding:
    """An engine's embedding of one image, that image's size in pixels and its cache identity."""

    embedding: Any
    width: int
    height: int
    identity: str = ""


class EmbeddingStore:
    """The engine, its lock and its embedding cache (EMBEDDING_CACHE_MB), shared by all projects.

    `images`: the server's image fetcher (`identity`, `loaded`); `metrics`: where the cache reports;
    `shared`: the L2 cache, by default opened from REDIS_URL (None when unset).
    """

    def __init__(
        self, engine: Any, settings: Settings, images: Any, metrics: Metrics, shared: SharedEmbeddings | None = None
    ):
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
        self._kind = engine_kind(engine)
        self.shared = shared if shared is not None else open_shared_embeddings(settings, engine, self._kind, metrics)
        self.refinements = RefinementMemory(self.cache, self.shared)
        self.sources = LookupCounts(metrics)
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
        loaded = False

        def load() -> ImageEmbedding:
            nonlocal loaded
            loaded = True
            return self._load(uri, task_id, identity, interactive)

        record = self.cache.get_or_compute(identity, load)
        if not loaded:
            self.sources.count("l1")
        return record

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
        shared = self.shared.health() if self.shared is not None else {"state": "off"}
        report = {
            "engine": self.engine.name,
            "device": str(getattr(self.engine, "device", "cpu")),
            "embedding_cache": {
                "bytes": self.cache.bytes,
                "entries": len(self.cache) - refinements,
                "refinements": refinements,
                "capacity_bytes": self.cache.capacity_bytes,
            },
            "embedding_sources": self.sources.snapshot(),
            "shared_cache": shared,
        }
        if shared["state"] == "down":
            report["status"] = "DEGRADED"
        return report

    def _load(self, uri: str, task_id: int | None, identity: str, interactive: bool) -> ImageEmbedding:
        """An L1 miss: from Redis when a replica has it (or is computing it), else computed here."""
        if self.shared is None or self._kind is None:
            record, source = self._compute(uri, task_id, identity, interactive), "computed"
        else:
            record, source = self.shared.get_or_compute(
                identity,
                lambda blob: self._decode(blob, identity),
                lambda: self._compute_shared(uri, task_id, identity, interactive),
            )
        self.sources.count(source)
        return record

    def _decode(self, blob: bytes, identity: str) -> ImageEmbedding:
        decoded = decode_embedding(blob, self._kind or "", str(getattr(self.engine, "device", "cpu")))
        return ImageEmbedding(decoded.embedding, width=decoded.width, height=decoded.height, identity=identity)

    def _compute_shared(
        self, uri: str, task_id: int | None, identity: str, interactive: bool
    ) -> tuple[ImageEmbedding, bytes | None]:
        """Compute, and the bytes to publish. This replica keeps the decoded bytes, not its own
        float32 result: every replica then decodes from the same fp16 values, so a click gives the
        same mask whichever replica answers it."""
        record = self._compute(uri, task_id, identity, interactive)
        try:
            blob = encode_embedding(record.embedding, record.width, record.height)
            return self._decode(blob, identity), blob
        except ValueError as error:  # an unknown kind, or BadValue (e.g. non-finite values): not shared
            log.warning("the embedding of %s is not shared: %s", identity, error)
            return record, None

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


class LookupCounts:
    """Embedding lookups by where they were answered: "l1" (this process), "l2" (Redis), "computed"
    (an engine embed call); exact under concurrency, and mirrored in /metrics."""

    SOURCES = ("l1", "l2", "computed")

    def __init__(self, metrics: Metrics) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.SOURCES, 0)
        counter = metrics.counter(
            "sam_embedding_lookups", "Embedding lookups by where they were answered (l1, l2, computed)", ("source",)
        )
        self._metrics = {source: counter.labels(source) for source in self.SOURCES}

    def count(self, source: str) -> None:
        with self._lock:
            self._counts[source] += 1
        self._metrics[source].inc()

    def snapshot(self) -> dict:
        with self._lock:
            counts = dict(self._counts)
        return {"l1_hits": counts["l1"], "l2_hits": counts["l2"], "recomputes": counts["computed"]}
