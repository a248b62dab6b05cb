"""SAM engines whose answers are known exactly, for driving the SAM backend in tests and load runs.

All follow the engine interface of `sam.engines`: `embed(image)` with image (H, W, 3) uint8 RGB,
and `predict(embedding, box=None, points=None, point_labels=None) -> ((H, W) bool mask, score)`
with box [x0, y0, x1, y1] and points [[x, y], ...] in pixels of the original image (x right,
y down). A backend loads them by name: SAM_ENGINE=BOX_ENGINE (or RED_ENGINE, DETERMINISTIC_ENGINE).

- `BoxEngine`: the mask is the box, plus 5x5 squares at positive points; a prompt the backend
  should have refused (`InvalidPrompt`) is a 500, which the fuzzers count as a failure.
- `RedEngine`: the red pixels inside the box: shows which frame (EXIF-rotated or stored) the
  engine was given and the mask came back in.
- `DeterministicEngine`: a striped pattern in the box whose period and phase come from a hash of
  the pixels (`expected_mask`, `expected_score`), with embeddings of `EMBEDDING_BYTES` so the
  byte-capped cache fills and evicts like real ones: a client that knows its image and prompt can
  check the exact answer, so any cross-talk between concurrent requests shows.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOX_ENGINE = "tests.support.engines:BoxEngine"
RED_ENGINE = "tests.support.engines:RedEngine"
DETERMINISTIC_ENGINE = "tests.support.engines:DeterministicEngine"


class InvalidPrompt(RuntimeError):
    """A prompt the backend should have refused with a 4xx reached the engine."""


def check_prompt(width: int, height: int, box, points, point_labels) -> None:
    """Raise InvalidPrompt unless box/points are finite, inside the W x H image and consistent."""
    if box is not None:
        x0, y0, x1, y1 = (float(v) for v in box)
        if not np.isfinite([x0, y0, x1, y1]).all():
            raise InvalidPrompt(f"non-finite box {box}")
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise InvalidPrompt(f"box {box} is not inside the {width}x{height} image")
    points = list(points or [])
    labels = list(point_labels or [])
    if len(points) != len(labels):
        raise InvalidPrompt(f"{len(points)} points but {len(labels)} labels")
    for (x, y), label in zip(points, labels, strict=True):
        if not (np.isfinite([x, y]).all() and 0 <= x <= width and 0 <= y <= height):
            raise InvalidPrompt(f"point {(x, y)} is not inside the {width}x{height} image")
        if label not in (0, 1):
            raise InvalidPrompt(f"point label {label!r}")
    if box is None and not points:
        raise InvalidPrompt("a prompt with neither box nor points")


class BoxEngine:
    """The mask is the prompt's box (pixels whose centre lies inside it), or 5x5 squares around
    positive points: exact, known answers in microseconds."""

    name = "box-engine"

    def embed(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (H, W) uint8 zeros (only the size matters)."""
        return np.zeros(image.shape[:2], np.uint8)

    def predict(self, embedding, box=None, points=None, point_labels=None):
        height, width = embedding.shape
        check_prompt(width, height, box, points, point_labels)
        mask = np.zeros((height, width), bool)
        if box is not None:
            x0, y0, x1, y1 = (float(v) for v in box)
            cols = np.arange(width) + 0.5
            rows = np.arange(height) + 0.5
            mask |= ((rows[:, None] >= y0) & (rows[:, None] <= y1)) & ((cols[None, :] >= x0) & (cols[None, :] <= x1))
        for (x, y), label in zip(points or [], point_labels or [], strict=False):  # no labels: no points drawn
            if label == 1:
                row, col = int(y), int(x)
                mask[max(0, row - 2) : row + 3, max(0, col - 2) : col + 3] = True
        return mask, 0.5


class RedEngine:
    """The mask is the red pixels of the image (R > 150, G and B < 100) inside the box."""

    name = "reliability-red"

    def embed(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (H, W) bool, True where the pixel is red."""
        red, green, blue = (image[..., channel].astype(int) for channel in range(3))
        return (red > 150) & (green < 100) & (blue < 100)

    def predict(self, embedding, box=None, points=None, point_labels=None):
        mask = np.zeros_like(embedding)
        if box is not None:
            x0, y0, x1, y1 = (round(float(v)) for v in box)
            mask[y0:y1, x0:x1] = embedding[y0:y1, x0:x1]
        return mask, 0.9


# ----------------------------------------------------------------------------- the deterministic engine

EMBEDDING_BYTES = 1 << 20  # 1 MiB per embedding (SAM vit_b: 4 MiB per image)
EMBED_SECONDS = 0.02  # a little compute time, so concurrent requests really overlap


def image_signature(image: np.ndarray) -> int:
    """(H, W, 3) uint8 RGB -> 64-bit signature of its shape and pixels."""
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
    """(H, W) bool mask for one prompt (box XYXY pixels, points [[x, y], ...] pixels).

    Inside round(box): pixels where (x + 2 y + phase) % period != 0, period in 3..7 and phase
    from the signature. Then 3x3 squares around positive points are set, around negative points
    cleared (points in order).
    """
    mask = np.zeros((height, width), dtype=bool)
    period = 3 + signature % 5
    phase = (signature >> 8) % period
    if box is not None:
        x0, y0, x1, y1 = (round(float(v)) for v in box)
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, width), min(y1, height)
        if x1 > x0 and y1 > y0:
            rows, cols = np.mgrid[y0:y1, x0:x1]
            mask[y0:y1, x0:x1] = (cols + 2 * rows + phase) % period != 0
    for (x, y), label in zip(points or [], point_labels or [], strict=False):  # no labels: no points drawn
        col, row = round(float(x)), round(float(y))
        mask[max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2] = bool(label)
    return mask


@dataclass(frozen=True)
class DeterministicEmbedding:
    signature: int
    height: int
    width: int
    filler: np.ndarray  # EMBEDDING_BYTES of uint8: what the cache counts


class DeterministicEngine:
    """Engine interface with exactly predictable answers (`expected_mask`, `expected_score`)."""

    name = "deterministic"
    device = "cpu"

    def __init__(self) -> None:
        self.embed_calls = 0

    def embed(self, image: np.ndarray) -> DeterministicEmbedding:
        """(H, W, 3) uint8 RGB -> DeterministicEmbedding (signature + EMBEDDING_BYTES filler)."""
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
        """-> ((H, W) bool mask of the whole image, score); see `expected_mask`."""
        mask = expected_mask(embedding.signature, embedding.height, embedding.width, box, points, point_labels)
        return mask, expected_score(embedding.signature)
