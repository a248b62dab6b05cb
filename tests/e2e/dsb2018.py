"""Picking DSB2018 images for end-to-end tests, and their truth (from ../shared/data/dsb2018)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 256  # only 256x256 images: the fluorescence ones, quick to train on, segment and fetch
# Mean grey level and nucleus area fraction of the images taken: dim fluorescence with enough
# nuclei that one image's IoU is not decided by a handful of pixels.
MEAN_RANGE = (4.0, 25.0)
FOREGROUND_RANGE = (0.05, 0.25)


def pick_images(shared_data: Path, count: int) -> list[Path]:
    """The first `count` DSB2018 images (by id) that are SIDExSIDE grey fluorescence images with
    a dark background (mean in MEAN_RANGE) and a nucleus area fraction in FOREGROUND_RANGE."""
    chosen = []
    for path in sorted((shared_data / "dsb2018" / "images").glob("*.png")):
        with Image.open(path) as image:
            if image.size != (SIDE, SIDE):
                continue
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        if np.abs(pixels - pixels[:, :, :1]).max() > 0:  # colour: bright-field or tissue
            continue
        foreground = true_mask(shared_data, path).mean()
        if MEAN_RANGE[0] <= pixels.mean() <= MEAN_RANGE[1] and FOREGROUND_RANGE[0] <= foreground <= FOREGROUND_RANGE[1]:
            chosen.append(path)
            if len(chosen) == count:
                return chosen
    raise AssertionError(f"only {len(chosen)} DSB2018 images match the selection, {count} needed")


def instance_labels(shared_data: Path, image_path: Path) -> np.ndarray:
    """HxW uint16 instance labels: 0 background, k nucleus k."""
    with Image.open(shared_data / "dsb2018" / "labels" / image_path.name) as labels:
        return np.asarray(labels)


def true_mask(shared_data: Path, image_path: Path) -> np.ndarray:
    """HxW bool: every nucleus of the image (instance label > 0)."""
    return instance_labels(shared_data, image_path) > 0


def largest_inner_instances(labels: np.ndarray, count: int) -> list[np.ndarray]:
    """The `count` largest instance masks (HxW bool) that do not touch the image border."""
    height, width = labels.shape
    candidates = []
    for value in np.unique(labels)[1:]:
        mask = labels == value
        rows, cols = np.nonzero(mask)
        if rows.min() > 0 and cols.min() > 0 and rows.max() < height - 1 and cols.max() < width - 1:
            candidates.append(mask)
    candidates.sort(key=lambda mask: -int(mask.sum()))
    return candidates[:count]
