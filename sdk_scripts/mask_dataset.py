"""A PyTorch Dataset over an export_masks folder (images/, masks/, label_map.json).

from sdk_scripts.mask_dataset import MaskDataset
dataset = MaskDataset("exported/")
image, mask = dataset[0]        # 3xHxW float32 in [0, 1], HxW int64 class indices
dataset.labels                  # ("Nucleus", "Cell"): class k is labels[k - 1]; 0 is background
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class MaskDataset(torch.utils.data.Dataset):
    """(image, mask) pairs with the same file stem in ``root/images`` and ``root/masks``.

    Items: ``image`` 3xHxW float32 RGB scaled to [0, 1]; ``mask`` HxW int64, 0 = background,
    k = ``labels[k - 1]``. `transform`, when given, is called as ``transform(image=HxWx3 uint8,
    mask=HxW uint8)`` before conversion to tensors and must return a dict with "image" and "mask"
    (the albumentations calling convention), e.g. for random flips or crops.
    Images without a mask (or masks without an image) are not items; `unpaired` names them.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None):
        self.root = Path(root)
        self.transform = transform
        images_dir, masks_dir = self.root / "images", self.root / "masks"
        if not images_dir.is_dir() or not masks_dir.is_dir():
            raise FileNotFoundError(f"{self.root} must hold images/ and masks/ (written by sdk_scripts.export_masks)")
        label_map_path = self.root / "label_map.json"
        label_map = json.loads(label_map_path.read_text(encoding="utf-8")) if label_map_path.is_file() else {}
        self.label_map: dict[str, int] = {str(label): int(index) for label, index in label_map.items()}
        self.labels: tuple[str, ...] = tuple(sorted(self.label_map, key=self.label_map.__getitem__))
        images = {p.stem: p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
        masks = {p.stem: p for p in masks_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
        self.pairs: list[tuple[Path, Path]] = [(images[s], masks[s]) for s in sorted(images.keys() & masks.keys())]
        self.unpaired: list[str] = sorted(images.keys() ^ masks.keys())

    @property
    def num_classes(self) -> int:
        """Classes including background."""
        return 1 + max(self.label_map.values(), default=0)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as opened:
            image = np.array(opened.convert("RGB"))
        with Image.open(mask_path) as opened:
            mask = np.array(opened)
        if mask.ndim != 2:
            raise ValueError(f"{mask_path}: a class-index mask has one channel, this one has {mask.shape[2]}")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{mask_path}: mask {mask.shape} does not match image {image.shape[:2]}")
        if self.transform is not None:
            transformed = self.transform(image=image, mask=mask)
            image, mask = transformed["image"], transformed["mask"]
            if isinstance(image, torch.Tensor):  # the transform ended with its own tensor conversion
                return image.float(), torch.as_tensor(mask).long()
        image_tensor = torch.from_numpy(np.ascontiguousarray(image).transpose(2, 0, 1).astype(np.float32) / 255.0)
        return image_tensor, torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))
