"""Whole-image prediction of any size: tiled with overlap, never resized, in memory near the image's.

The windows are monai's sliding-window ones (as `monai.data.utils.dense_patch_slices` places them:
tile-sized at most, `overlap` apart, the last one flush with the edge), blended with monai's
Gaussian importance map (`compute_importance_map`, sigma 1/8 of the tile), so the result is what
`monai.inferers.sliding_window_inference` gives; both are re-stated here so that inference does not
import monai (seconds of start-up). What differs is memory: each
window is normalised (by the whole image's mean and standard deviation) and mirror-padded (only
where the image is smaller than the tile) on its own, and windows are consumed in row order, so
the rows above the next band of windows are final and are turned into mask and confidences at
once. Only a band of one tile's height of logits is held, never C x H x W floats of the whole
image (a 16 MP image took +1.4 GB that way). The mask returned has the image's exact height and
width.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segmentation.normalization import PER_IMAGE, Normalization

# Pixels where the network gives the foreground classes together at least this much
# probability are the ones whose confidence makes up the overall score.
RELEVANT_FOREGROUND_PROBABILITY = 0.1


@dataclass(frozen=True)
class Segmentation:
    """Prediction for one image.

    mask: HxW uint8 class indices (0 = background).
    confidence: HxW float16, softmax probability of the chosen class.
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


def segment_images(
    network: torch.nn.Module, images: Sequence[np.ndarray], device: torch.device | str, **options: Any
) -> list[Segmentation]:
    """Predict class-index masks for HxWx3 uint8 images of any sizes (one Segmentation each);
    `options` (tile, batch_size, size_multiple, overlap, normalization) as in `iter_segmentations`."""
    return list(iter_segmentations(network, images, device, **options))


def iter_segmentations(
    network: torch.nn.Module,
    images: Iterable[np.ndarray],
    device: torch.device | str,
    tile: int = 512,
    batch_size: int = 4,
    size_multiple: int = 16,
    overlap: float = 0.25,
    normalization: Normalization = PER_IMAGE,
) -> Iterator[Segmentation]:
    """One Segmentation per HxWx3 uint8 image, in order, as soon as each is done.

    `images` may be a generator (e.g. reading from disk): it is advanced only when its next image
    is needed, so at most about `batch_size` images are held at once. Windows of `tile` pixels
    square at most (shrunk to a multiple of `size_multiple` for smaller images) go through the
    network `batch_size` at a time, across image boundaries when they have the same size.
    `normalization`: what the network expects (the model version's; default per image). On a GPU
    the forward pass runs under bf16 autocast (fp16 where bf16 is not supported).
    """
    network.eval()
    importance: dict[tuple[int, int], torch.Tensor] = {}
    queued: list[tuple[_TiledImage, int, int]] = []
    unfinished: collections.deque[_TiledImage] = collections.deque()
    for image in images:
        tiled = _TiledImage(image, tile, size_multiple, overlap, normalization)
        unfinished.append(tiled)
        for top, left in tiled.windows:
            if queued and (len(queued) == batch_size or queued[0][0].roi != tiled.roi):
                _forward(network, queued, device, importance)
                queued = []
                yield from _finished(unfinished)
            queued.append((tiled, top, left))
    if queued:
        _forward(network, queued, device, importance)
    yield from _finished(unfinished)


def _finished(unfinished: collections.deque) -> Iterator[Segmentation]:
    """Pop and yield the results of the leading images whose windows are all blended."""
    while unfinished and unfinished[0].done:
        yield unfinished.popleft().result()


def _forward(network: torch.nn.Module, queued: list, device: torch.device | str, importance: dict) -> None:
    """Run one batch of same-sized windows and blend each output into its image. (Inference mode
    here, not around the generator: a suspended generator would leave it on for its caller.)"""
    roi = queued[0][0].roi
    with torch.inference_mode():
        if roi not in importance:
            importance[roi] = gaussian_importance(roi, device)
        batch = np.stack([tiled.window_input(top, left) for tiled, top, left in queued])
        with autocast(device):
            logits = network(torch.from_numpy(batch).to(device)).float()
        for (tiled, top, left), window_logits in zip(queued, logits, strict=True):
            tiled.blend(top, left, window_logits, importance[roi])


def autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Mixed precision on a GPU (bf16, or fp16 where bf16 is missing); nothing on a CPU, where
    fp32 is what runs fastest and what training validated. One code path for both."""
    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class _TiledImage:
    """One image's windows, its blended logits for one band of rows, and its finished results.

    Rows are final once a window starting further down arrives (windows come in row order);
    final rows become mask, confidence and running sums, and leave the band.
    """

    def __init__(self, image: np.ndarray, tile: int, size_multiple: int, overlap: float, normalization: Normalization):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
        self.image: np.ndarray | None = image  # released by result()
        self.height, self.width = image.shape[:2]
        self.roi = (min(tile, _ceil_to(self.height, size_multiple)), min(tile, _ceil_to(self.width, size_multiple)))
        # Sides smaller than the window are mirror-padded up to it.
        self.padded = (max(self.height, self.roi[0]), max(self.width, self.roi[1]))
        starts = [window_starts(side, roi, overlap) for side, roi in zip(self.padded, self.roi, strict=True)]
        self.windows = [(top, left) for top in starts[0] for left in starts[1]]  # row by row
        self._unblended = len(self.windows)
        self._mean, self._divisor = normalization.statistics(image)
        self._band_top = 0
        self._logits: torch.Tensor | None = None  # C x roi_h x padded_w, rows from _band_top
        self._weights: torch.Tensor | None = None  # roi_h x padded_w
        self.mask = np.zeros((self.height, self.width), np.uint8)
        self.confidence = np.zeros((self.height, self.width), np.float16)
        self._class_sums: np.ndarray | None = None  # per class: [sum of confidence, pixel count]
        self._relevant = [0.0, 0]  # sum of confidence, pixels where foreground is plausible

    @property
    def done(self) -> bool:
        return self._unblended == 0

    def window_input(self, top: int, left: int) -> np.ndarray:
        """The window at (top, left) as 3 x roi_h x roi_w float32, normalised with the whole image's
        statistics (per image) or the model's fixed ones, mirror-padded at the bottom/right where the image is smaller."""
        if self.image is None:
            raise RuntimeError("the image was released by result()")
        rows, cols = self.roi
        pixels = self.image[top : top + rows, left : left + cols]
        pad_rows, pad_cols = rows - pixels.shape[0], cols - pixels.shape[1]
        if pad_rows or pad_cols:
            pixels = np.pad(pixels, ((0, pad_rows), (0, pad_cols), (0, 0)), mode="symmetric")
        window = pixels.astype(np.float32).transpose(2, 0, 1)
        return (window - self._mean) / self._divisor

    def blend(self, top: int, left: int, logits: torch.Tensor, weight: torch.Tensor) -> None:
        """Add one window's C x roi_h x roi_w logits, weighted by the importance map."""
        if self._logits is None:
            self._logits = torch.zeros((logits.shape[0], self.roi[0], self.padded[1]), device=logits.device)
            self._weights = torch.zeros((self.roi[0], self.padded[1]), device=logits.device)
            self._class_sums = np.zeros((logits.shape[0], 2), np.float64)
        if top > self._band_top:
            self._finish_rows(top)
        band_logits, band_weights, _ = self._band()
        cols = slice(left, left + self.roi[1])
        band_logits[:, :, cols] += logits * weight
        band_weights[:, cols] += weight
        self._unblended -= 1
        if self.done:
            self._finish_rows(self.padded[0])

    def _band(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """The band's logits and weights and the class sums (allocated by the first `blend`)."""
        if self._logits is None or self._weights is None or self._class_sums is None:
            raise RuntimeError("no window has been blended yet")
        return self._logits, self._weights, self._class_sums

    def _finish_rows(self, until: int) -> None:
        """Rows _band_top..until are final: softmax, argmax, sums; then drop them from the band."""
        logits, weights, _ = self._band()
        count = until - self._band_top
        probs = torch.softmax(logits[:, :count] / weights[:count], dim=0)
        keep = min(until, self.height) - self._band_top
        if keep > 0:
            self._record(self._band_top, probs[:, :keep, : self.width])
        if count < self.roi[0]:  # rows still open move up to the top of the band
            logits[:, : self.roi[0] - count] = logits[:, count:].clone()
            weights[: self.roi[0] - count] = weights[count:].clone()
        logits[:, self.roi[0] - count :] = 0
        weights[self.roi[0] - count :] = 0
        self._band_top = until

    def _record(self, top: int, probs: torch.Tensor) -> None:
        """Store mask and confidence of rows top.. from their C x rows x W probabilities."""
        best, winner = probs.max(dim=0)
        plausible = (1.0 - probs[0]) >= RELEVANT_FOREGROUND_PROBABILITY
        confidence, mask, relevant = best.cpu().numpy(), winner.cpu().numpy(), plausible.cpu().numpy()
        rows = slice(top, top + mask.shape[0])
        self.mask[rows] = mask
        self.confidence[rows] = confidence
        class_sums = self._band()[2]
        classes = class_sums.shape[0]
        class_sums[:, 0] += np.bincount(mask.ravel(), weights=confidence.ravel(), minlength=classes)
        class_sums[:, 1] += np.bincount(mask.ravel(), minlength=classes)
        self._relevant[0] += float(confidence[relevant].sum(dtype=np.float64))
        self._relevant[1] += int(relevant.sum())

    def result(self) -> Segmentation:
        class_sums = self._band()[2]
        sums, counts = class_sums[:, 0], class_sums[:, 1]
        class_confidence = {int(k): float(sums[k] / counts[k]) for k in range(1, len(counts)) if counts[k] > 0}
        relevant_sum, relevant_count = self._relevant
        score = relevant_sum / relevant_count if relevant_count else float(sums.sum() / max(counts.sum(), 1))
        self.image = None  # the caller may drop its pixels now
        return Segmentation(self.mask, self.confidence, class_confidence, float(score))


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Where windows of `roi` pixels start along a side of `size` >= roi pixels: every
    int(roi * (1 - overlap)) pixels (the whole roi when it fills the side), the last one moved
    back to end flush with the side; as monai's `dense_patch_slices` places them."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    count = next((d + 1 for d in range(math.ceil(size / interval)) if d * interval + roi >= size), 1)
    return [d * interval - max(d * interval + roi - size, 0) for d in range(count)]


def gaussian_importance(roi: tuple[int, int], device: torch.device | str) -> torch.Tensor:
    """roi_h x roi_w float32 blending weights, highest in the middle: monai's
    `compute_importance_map(roi, mode="gaussian", sigma_scale=0.125)`."""
    rows, cols = (_gaussian(length, device) for length in roi)
    weights = rows.unsqueeze(-1) * cols[None]
    return torch.clamp_(weights, min=max(torch.min(weights).item(), 1e-3))


def _gaussian(length: int, device: torch.device | str) -> torch.Tensor:
    sigma = length * 0.125
    x = torch.arange(start=-(length - 1) / 2.0, end=(length - 1) / 2.0 + 1, dtype=torch.float, device=device)
    return torch.exp(x**2 / (-2 * sigma**2))


def segmentation_from_probabilities(probs: np.ndarray) -> Segmentation:
    """CxHxW float32 softmax probabilities -> Segmentation (argmax mask and confidences), for
    small arrays; whole images go through `segment_images`, which never holds CxHxW floats."""
    mask = probs.argmax(axis=0).astype(np.uint8)
    confidence = probs.max(axis=0).astype(np.float32)
    class_confidence = {int(k): float(confidence[mask == k].mean()) for k in np.unique(mask) if k != 0}
    return Segmentation(mask, confidence.astype(np.float16), class_confidence, overall_score(probs, confidence))


def overall_score(probs: np.ndarray, confidence: np.ndarray) -> float:
    """Mean confidence over the pixels where any foreground is plausible.

    Averaging over the whole image would let the (usually large, easy) background drown
    out doubtful objects; pixels where foreground gets >= 10 % are the ones that matter.
    An image the network is sure is empty scores its mean confidence.
    """
    relevant = (1.0 - probs[0]) >= RELEVANT_FOREGROUND_PROBABILITY
    return float(confidence[relevant].mean() if relevant.any() else confidence.mean())
