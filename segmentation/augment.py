"""Augmentation of (image, mask) training crops with albumentations.

Geometric transforms move image and mask together (mask with nearest-neighbour
interpolation, so class indices stay class indices); photometric ones touch the image only.
Borders are reflected so no artificial black frame (or background band) appears.

The photometric part stands for what a new image can be that the annotated ones were not:
inverted contrast (a fluorescence crop, dark background and bright nuclei, inverted looks like a
bright-field one, bright background and dark nuclei; only grey crops are inverted, an inverted
stained crop is no real image), another stain or scanner (hue and saturation shifts), another
exposure (brightness, contrast, gamma) and another magnification (scale).
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np

# A crop counts as grey when no pixel's channels differ by more than this (JPEG noise included).
GREY_TOLERANCE = 8


class InvertGrey(A.InvertImg):
    """Invert a grey crop (255 - pixel); leave colour crops as they are."""

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return super().apply(img, **params) if is_grey(img) else img


def is_grey(image: np.ndarray) -> bool:
    """Whether an HxWx3 uint8 image's channels agree everywhere (within GREY_TOLERANCE)."""
    if image.ndim < 3 or image.shape[2] < 3:
        return True
    channels = image.astype(np.int16)
    return bool(np.abs(channels[..., 1:] - channels[..., :1]).max(initial=0) <= GREY_TOLERANCE)


def build_augmentation(seed: int | None = None) -> A.Compose:
    """Flips, 90-degree rotations, affine scale/rotation, elastic warp; grey inversion, hue and
    saturation (stain), brightness/contrast and gamma jitter.

    Call as `augment(image=HxWx3 uint8, mask=HxW uint8)`; returns the same shapes and dtypes.
    `seed` makes the sequence of transforms reproducible (albumentations keeps its own random
    state, untouched by torch / numpy / random seeds); None draws a fresh one.
    """
    reflect = cv2.BORDER_REFLECT_101
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(scale=(0.6, 1.6), rotate=(-30, 30), border_mode=reflect, p=0.5),
            A.ElasticTransform(alpha=30, sigma=6, border_mode=reflect, p=0.2),
            InvertGrey(p=0.3),
            A.HueSaturationValue(hue_shift_limit=15, sat_shift_limit=30, val_shift_limit=0, p=0.3),
            A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.3, p=0.5),
            A.RandomGamma(gamma_limit=(70, 150), p=0.3),
        ],
        seed=seed,
    )


def apply(augment: A.Compose | None, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply `augment` (or nothing) to HxWx3 uint8 `image` and HxW uint8 class-index `mask`."""
    if augment is None:
        return image, mask
    out = augment(image=image, mask=mask)
    return out["image"], out["mask"]
