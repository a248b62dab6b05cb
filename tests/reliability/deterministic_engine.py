"""A custom SAM engine whose answer is known exactly, for concurrency and load tests.

`SAM_ENGINE=tests.reliability.deterministic_engine:DeterministicEngine`

- `embed(image)` hashes the pixels into a 64-bit `signature` and keeps a filler buffer of
  `EMBEDDING_BYTES` bytes, so the byte-capped embedding cache fills and evicts like real
  embeddings do (SAM vit_b: 4 MiB per image).
- `predict(embedding, box, points, point_labels)` draws `expected_mask(...)`: a striped pattern
  inside the box whose stripe period and phase come from the signature, plus 3x3 squares at
  positive points minus 3x3 squares at negative points. The score is `expected_score(signature)`.

A client that knows the image it sent and the prompt it drew can therefore compute the exact
mask and score it must get back: any cross-talk between annotators (another image's embedding,
another request's prompt) shows up as a wrong pattern, size or score.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

EMBEDDING_BYTES = 1 << 20  # 1 MiB per embedding
EMBED_SECONDS = 0.02  # a little compute time, so concurrent requests really overlap


def image_signature(image: np.ndarray) -> int:
    """HxWx3 uint8 RGB -> 64-bit signature of its shape and pixels."""
    pixels = np.ascontiguousarray(image, dtype=np.uint8)
    digest = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).digest()
    return int.from_bytes(digest[:8], "little")


def expected_score(signature: int) -> float:
    """The score the engine reports for any prompt on the image with `signature`: in [0.5, 1)."""
    return 0.5 + (signature % 1000) / 2000.0


def expected_mask(
    signature: int,
    height: int,
    width: int,
    box: Sequence[float] | None = None,
    points: Sequence[Sequence[float]] | None = None,
    point_labels: Sequence[int] | None = None,
) -> np.ndarray:
    """HxW bool mask for one prompt (box XYXY pixels, points [[x, y], ...] pixels, x right, y down).

    Inside round(box): pixels where (x + 2 y + phase) % period != 0, period in 3..7 and phase
    from the signature. Then 3x3 squares around positive points are set, around negative points
    cleared (points in order).
    """
    mask = np.zeros((height, width), dtype=bool)
    period = 3 + signature % 5
    phase = (signature >> 8) % period
    if box is not None:
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, width), min(y1, height)
        if x1 > x0 and y1 > y0:
            rows, cols = np.mgrid[y0:y1, x0:x1]
            mask[y0:y1, x0:x1] = (cols + 2 * rows + phase) % period != 0
    for (x, y), label in zip(points or [], point_labels or []):
        col, row = int(round(float(x))), int(round(float(y)))
        mask[max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2] = bool(label)
    return mask


@dataclass(frozen=True)
class DeterministicEmbedding:
    signature: int
    height: int
    width: int
    filler: np.ndarray  # EMBEDDING_BYTES of uint8: what the cache counts


class DeterministicEngine:
    """Engine interface (see sam/engines/__init__.py) with exactly predictable answers."""

    name = "deterministic"
    device = "cpu"

    def __init__(self) -> None:
        self.embed_calls = 0

    def embed(self, image: np.ndarray) -> DeterministicEmbedding:
        """HxWx3 uint8 RGB -> DeterministicEmbedding (signature + EMBEDDING_BYTES filler)."""
        image = np.asarray(image)
        self.embed_calls += 1
        time.sleep(EMBED_SECONDS)
        signature = image_signature(image)
        filler = np.full(EMBEDDING_BYTES, signature & 0xFF, dtype=np.uint8)
        return DeterministicEmbedding(signature, int(image.shape[0]), int(image.shape[1]), filler)

    def embedding_nbytes(self, embedding: DeterministicEmbedding) -> int:
        return int(embedding.filler.nbytes)

    def predict(
        self,
        embedding: DeterministicEmbedding,
        box: Sequence[float] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, float]:
        """-> (HxW bool mask of the whole image, score); see `expected_mask`."""
        mask = expected_mask(embedding.signature, embedding.height, embedding.width, box, points, point_labels)
        return mask, expected_score(embedding.signature)
