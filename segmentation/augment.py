"""Augmentation of (image, mask) training crops with albumentations.

Geometric transforms move image and mask together (mask with nearest-neighbour
interpolation, so class indices stay class indices); photometric ones touch the image only.
Borders are reflected so no artificial black frame (or background band) appears.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np


def build_augmentation(seed: int | None = None) -> A.Compose:
    """Flips, 90-degree rotations, affine scale/rotation, brightness/contrast, elastic warp.

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
            A.Affine(scale=(0.8, 1.25), rotate=(-30, 30), border_mode=reflect, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.ElasticTransform(alpha=30, sigma=6, border_mode=reflect, p=0.2),
        ],
        seed=seed,
    )


def apply(augment: A.Compose | None, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply `augment` (or nothing) to HxWx3 uint8 `image` and HxW uint8 class-index `mask`."""
    if augment is None:
        return image, mask
    out = augment(image=image, mask=mask)
    return out["image"], out["mask"]
