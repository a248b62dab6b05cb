"""Cheap deterministic engines for the reliability suite (SAM_ENGINE=tests.reliability.engines:Class).

Both follow the engine interface of `sam.engines`: `embed(image)` with image HxWx3 uint8 RGB, and
`predict(embedding, box=None, points=None, point_labels=None) -> (HxW bool mask, score)` with box
[x0, y0, x1, y1] and points [[x, y], ...] in pixels of the original image (x right, y down).
"""
from __future__ import annotations

import numpy as np


class BoxEngine:
    """The mask is the prompt's box (pixels whose centre lies inside it), or 5x5 squares around
    positive points: exact, known answers in microseconds."""

    name = "reliability-box"

    def embed(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> HxW uint8 zeros (only the size matters)."""
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
        for (x, y), label in zip(points or [], point_labels or []):
            if label == 1:
                row, col = int(y), int(x)
                mask[max(0, row - 2): row + 3, max(0, col - 2): col + 3] = True
        return mask, 0.5


class InvalidPrompt(RuntimeError):
    """A prompt the backend should have refused with a 4xx reached the engine (answered as a 500,
    which the fuzzers count as a failure)."""


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
    for (x, y), label in zip(points, labels):
        if not (np.isfinite([x, y]).all() and 0 <= x <= width and 0 <= y <= height):
            raise InvalidPrompt(f"point {(x, y)} is not inside the {width}x{height} image")
        if label not in (0, 1):
            raise InvalidPrompt(f"point label {label!r}")
    if box is None and not points:
        raise InvalidPrompt("a prompt with neither box nor points")


class RedEngine:
    """The mask is the red pixels of the image (R > 150, G and B < 100) inside the box: shows which
    frame (EXIF-rotated or stored) the engine was given and the mask came back in."""

    name = "reliability-red"

    def embed(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> HxW bool, True where the pixel is red."""
        red, green, blue = (image[..., channel].astype(int) for channel in range(3))
        return (red > 150) & (green < 100) & (blue < 100)

    def predict(self, embedding, box=None, points=None, point_labels=None):
        mask = np.zeros_like(embedding)
        if box is not None:
            x0, y0, x1, y1 = (int(round(float(v))) for v in box)
            mask[y0:y1, x0:x1] = embedding[y0:y1, x0:x1]
        return mask, 0.9
