"""How an image's pixels become a network's input: per-image standardisation or fixed statistics.

The U-Net trained here standardises each image by its own mean and standard deviation (so
fluorescence and bright-field images look alike to it). A pretrained model expects what its image
processor did in pre-training: pixels / 255, minus a per-channel mean, over a per-channel standard
deviation (ImageNet's for SegFormer). Both are `(pixels - mean) / divisor` on HxWx3 uint8
values, with scalars or per-channel 3x1x1 arrays, so training crops and inference windows share one
formula. NumPy only: inference must not import the training stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Image statistics are gathered this many pixels at a time.
_STATISTICS_BLOCK_PIXELS = 1 << 20
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """mean / std None: per image (the whole image's mean and standard deviation, all channels
    together). Otherwise per channel, RGB, in units of pixel / 255 (as image processors state them)."""

    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @property
    def per_image(self) -> bool:
        return self.mean is None or self.std is None

    def statistics(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, divisor) as float32 arrays broadcasting against 3xHxW pixel values 0..255."""
        if self.mean is None or self.std is None:
            image_mean, image_divisor = image_statistics(image)
            return np.asarray(image_mean, np.float32), np.asarray(image_divisor, np.float32)
        mean = np.asarray(self.mean, np.float32).reshape(3, 1, 1) * 255
        divisor = np.maximum(np.asarray(self.std, np.float32).reshape(3, 1, 1) * 255, np.float32(1e-3))
        return mean, divisor

    def apply(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> 3xHxW float32 network input."""
        mean, divisor = self.statistics(image)
        return (image.astype(np.float32).transpose(2, 0, 1) - mean) / divisor

    def to_json(self) -> dict:
        return {} if self.per_image else {"mean": list(self.mean or ()), "std": list(self.std or ())}

    @classmethod
    def from_json(cls, data: dict | None) -> Normalization:
        if not data or data.get("mean") is None:
            return cls()
        mean, std = (tuple(float(v) for v in data[key]) for key in ("mean", "std"))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"normalization needs 3 means and 3 standard deviations, got {data}")
        return cls((mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))


def image_statistics(image: np.ndarray) -> tuple[np.float32, float]:
    """(mean as float32, max(standard deviation, 1)) of all samples of an HxWx3 uint8 image, as
    `data.normalize` uses them, from a histogram gathered a block of rows at a time."""
    height, width = image.shape[:2]
    histogram = np.zeros(256, np.int64)
    rows = max(1, _STATISTICS_BLOCK_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        histogram += np.bincount(np.asarray(image[top : top + rows]).ravel(), minlength=256)
    total = int(histogram.sum())
    if total == 0:
        return np.float32(0.0), 1.0
    values = np.arange(256, dtype=np.float64)
    mean = float((histogram * values).sum() / total)
    variance = float((histogram * (values - mean) ** 2).sum() / total)
    return np.float32(mean), max(float(np.float32(math.sqrt(variance))), 1.0)


#: The U-Net's: each image (or training crop) by its own statistics.
PER_IMAGE = Normalization()
