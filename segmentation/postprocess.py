"""Clean masks: a confidence floor, small specks dropped, small holes filled. Pure NumPy/OpenCV.

Applied to each prediction (SEG_MIN_CONFIDENCE, SEG_MIN_COMPONENT_PX, SEG_FILL_HOLES_PX), in
this order: pixels whose winning class has less than the floor become background (an unfamiliar
image yields few false positives rather than a flood); then, per class, connected components
(8-connected) smaller than the minimum become background; then, per class, holes (4-connected
regions not of that class, not touching the image's border) smaller than the fill size become
that class. Each pixel keeps one label throughout. Regions then carry the mean confidence of
their class's pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np

from segmentation.tiled_inference import Segmentation


@dataclass(frozen=True)
class Cleaning:
    """What post-processing does; all zero: nothing."""

    min_confidence: float = 0.0  # SEG_MIN_CONFIDENCE
    min_component_px: int = 0  # SEG_MIN_COMPONENT_PX
    fill_holes_px: int = 0  # SEG_FILL_HOLES_PX

    @classmethod
    def from_settings(cls, settings) -> Cleaning:
        return cls(settings.seg_min_confidence, settings.seg_min_component_px, settings.seg_fill_holes_px)


def clean_segmentation(segmentation: Segmentation, cleaning: Cleaning) -> Segmentation:
    """The segmentation with its mask cleaned and each class's mean confidence taken again over the
    pixels it keeps (the overall score stays: it says how sure the network was)."""
    if cleaning == Cleaning():
        return segmentation
    mask = clean_mask(segmentation.mask, segmentation.confidence, cleaning)
    return dataclasses.replace(
        segmentation, mask=mask, class_confidence=class_confidences(mask, segmentation.confidence)
    )


def clean_mask(mask: np.ndarray, confidence: np.ndarray, cleaning: Cleaning) -> np.ndarray:
    """HxW uint8 class indices (0 background) and HxW confidences -> a cleaned HxW uint8 mask (new)."""
    cleaned = np.array(mask, dtype=np.uint8, copy=True)
    if cleaning.min_confidence > 0:
        cleaned[np.asarray(confidence, np.float32) < cleaning.min_confidence] = 0
    if cleaning.min_component_px > 1:
        for k in _present_classes(cleaned):
            drop_small_components(cleaned, k, cleaning.min_component_px)
    if cleaning.fill_holes_px > 0:
        for k in _present_classes(cleaned):
            fill_small_holes(cleaned, k, cleaning.fill_holes_px)
    return cleaned


def _present_classes(mask: np.ndarray) -> list[int]:
    counts = np.bincount(mask.ravel(), minlength=1)
    return [int(k) for k in np.flatnonzero(counts) if k != 0]


def drop_small_components(mask: np.ndarray, class_index: int, min_pixels: int) -> None:
    """In place: 8-connected components of `class_index` with fewer than `min_pixels` pixels -> 0."""
    small = _small_components(mask == class_index, min_pixels, connectivity=8)
    mask[small] = 0


def fill_small_holes(mask: np.ndarray, class_index: int, max_pixels: int) -> None:
    """In place: 4-connected regions of other classes that `class_index` encloses (they do not touch
    the border) with fewer than `max_pixels` pixels -> class_index."""
    outside = mask != class_index
    holes = _small_components(outside, max_pixels, connectivity=4, exclude_border=True)
    mask[holes] = class_index


def _small_components(binary: np.ndarray, below: int, connectivity: int, exclude_border: bool = False) -> np.ndarray:
    """HxW bool: pixels of components of `binary` smaller than `below` pixels."""
    if not binary.any():
        return np.zeros_like(binary)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=connectivity)
    small = stats[:, cv2.CC_STAT_AREA] < below
    small[0] = False  # label 0 is what `binary` does not cover
    if exclude_border:
        height, width = binary.shape
        left, top = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
        right = left + stats[:, cv2.CC_STAT_WIDTH]
        bottom = top + stats[:, cv2.CC_STAT_HEIGHT]
        small &= (left > 0) & (top > 0) & (right < width) & (bottom < height)
    if not small.any():
        return np.zeros_like(binary)
    return small[labels]


def class_confidences(mask: np.ndarray, confidence: np.ndarray) -> dict[int, float]:
    """class index -> mean confidence over its pixels, for the foreground classes present."""
    counts = np.bincount(mask.ravel())
    sums = np.bincount(mask.ravel(), weights=np.asarray(confidence, np.float64).ravel())
    return {k: float(sums[k] / counts[k]) for k in range(1, len(counts)) if counts[k] > 0}
