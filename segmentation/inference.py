"""Whole-image prediction of any size: tiled with overlap, never resized.

Images are normalised, padded (mirror) only where a side is smaller than the tile, run through
monai's sliding-window inferer with Gaussian blending of overlapping tiles, and the padding is
cut off again: the mask returned always has the image's exact height and width.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from segmentation.data import normalize

# Pixels where the network gives the foreground classes together at least this much
# probability are the ones whose confidence makes up the overall score.
RELEVANT_FOREGROUND_PROBABILITY = 0.1


@dataclass(frozen=True)
class Segmentation:
    """Prediction for one image.

    mask: HxW uint8 class indices (0 = background).
    confidence: HxW float32, softmax probability of the chosen class.
    class_confidence: class index -> mean confidence over its predicted pixels (present
        foreground classes only).
    score: overall confidence in [0, 1] (low = worth a human look; see `overall_score`).
    """

    mask: np.ndarray
    confidence: np.ndarray
    class_confidence: dict[int, float]
    score: float


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def probabilities(
    network: torch.nn.Module,
    images: Sequence[np.ndarray],
    device: torch.device,
    tile: int = 512,
    batch_size: int = 4,
    overlap: float = 0.25,
    size_multiple: int = 16,
) -> list[np.ndarray]:
    """Softmax probabilities for each HxWx3 uint8 image -> list of CxHxW float32 (same H, W).

    Images of equal size are stacked into batches of `batch_size`; tiles are `tile` pixels
    square at most and shrink (to a multiple of `size_multiple`) for smaller images.
    """
    network.eval()
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        by_shape[image.shape].append(index)
    results: list[np.ndarray | None] = [None] * len(images)
    with torch.inference_mode():
        for (height, width, _), indices in by_shape.items():
            roi = (min(tile, _ceil_to(height, size_multiple)), min(tile, _ceil_to(width, size_multiple)))
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                batch = np.stack([_pad(normalize(images[i]), roi) for i in chunk])
                inputs = torch.from_numpy(batch).to(device)
                logits = sliding_window_inference(
                    inputs, roi_size=roi, sw_batch_size=batch_size, predictor=network,
                    overlap=overlap, mode="gaussian",
                )
                probs = torch.softmax(logits.float(), dim=1)[:, :, :height, :width].cpu().numpy()
                for i, prob in zip(chunk, probs):
                    results[i] = np.ascontiguousarray(prob)
    return results  # type: ignore[return-value]


def _pad(pixels: np.ndarray, roi: tuple[int, int]) -> np.ndarray:
    """Mirror-pad 3xHxW at the bottom/right so that H >= roi[0] and W >= roi[1]."""
    _, height, width = pixels.shape
    pad_h, pad_w = max(0, roi[0] - height), max(0, roi[1] - width)
    if not (pad_h or pad_w):
        return pixels
    return np.pad(pixels, ((0, 0), (0, pad_h), (0, pad_w)), mode="symmetric")


def segmentation_from_probabilities(probs: np.ndarray) -> Segmentation:
    """CxHxW float32 softmax probabilities -> Segmentation (argmax mask and confidences)."""
    mask = probs.argmax(axis=0).astype(np.uint8)
    confidence = probs.max(axis=0).astype(np.float32)
    class_confidence = {
        int(k): float(confidence[mask == k].mean()) for k in np.unique(mask) if k != 0
    }
    return Segmentation(mask, confidence, class_confidence, overall_score(probs, confidence))


def overall_score(probs: np.ndarray, confidence: np.ndarray) -> float:
    """Mean confidence over the pixels where any foreground is plausible.

    Averaging over the whole image would let the (usually large, easy) background drown
    out doubtful objects; pixels where foreground gets >= 10 % are the ones that matter.
    An image the network is sure is empty scores its mean confidence.
    """
    relevant = (1.0 - probs[0]) >= RELEVANT_FOREGROUND_PROBABILITY
    return float(confidence[relevant].mean() if relevant.any() else confidence.mean())


def segment_images(
    network: torch.nn.Module,
    images: Sequence[np.ndarray],
    device: torch.device,
    tile: int = 512,
    batch_size: int = 4,
    size_multiple: int = 16,
) -> list[Segmentation]:
    """Predict class-index masks for HxWx3 uint8 images of any sizes (one Segmentation each)."""
    probs = probabilities(network, images, device, tile=tile, batch_size=batch_size, size_multiple=size_multiple)
    return [segmentation_from_probabilities(p) for p in probs]
