"""The data and the plain baseline of `bench.seg_quality`'s generalisation and transfer figures.

DSB2018 split (fixed, documented, never tuned on the report part):
- each image's kind comes from its pixels (`image_kind`): mean grey level below 100 (dark
  background) is fluorescence; otherwise a mean channel spread (max - min of R, G, B) above 5
  is H&E (stained tissue), else bright-field (grey, bright background). On the 410 shared images:
  336 fluorescence, 66 H&E, 8 bright-field;
- within each kind, images sorted by id are shuffled with Random(2018) and dealt alternately to
  the tune part (even positions) and the report part (odd positions): 205 + 205;
- training uses `GENERAL_TRAIN` images drawn with Random(0) from the tune part (kinds as they fall);
  the report set holds every bright-field and H&E image of the report part, filled up with its
  fluorescence images in shuffled order to `GENERAL_REPORT` images. Pretraining for the transfer
  figure uses the whole tune part.
Yeast (13 images): held out are test-image.png and the last two other names in sorted order;
fine-tuning draws its 3 images with Random(3) from the other 10, and uses all 10 for 10.

The plain loop: the same U-Net, uniform random crops, random horizontal/vertical flips, per-image
standardisation, monai's DiceCELoss, Adam at 1e-3, no validation, the last weights at the end of
the time budget.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from PIL import Image

from segmentation.data import Sample, normalize, pad_to_at_least, read_image
from segmentation.families import build
from segmentation.network import NetworkConfig

KINDS = ("fluorescence", "brightfield", "he")
GENERAL_TRAIN, GENERAL_REPORT = 30, 100
FLUORESCENCE_MAX_GREY = 100.0
GREY_MAX_SPREAD = 5.0
YEAST_LABELS = ("mother", "daughter")


def image_kind(image: np.ndarray) -> str:
    """fluorescence, brightfield or he, from an HxWx3 uint8 image's mean grey and channel spread."""
    pixels = image.astype(np.float32)
    if pixels.mean() < FLUORESCENCE_MAX_GREY:
        return "fluorescence"
    spread = float((pixels.max(axis=2) - pixels.min(axis=2)).mean())
    return "he" if spread > GREY_MAX_SPREAD else "brightfield"


def dsb_sample(root: Path, image_id: str) -> Sample:
    """Foreground = instance label > 0."""
    labels = np.array(Image.open(root / "labels" / f"{image_id}.png"))
    return Sample(image_id, read_image(root / "images" / f"{image_id}.png"), (labels > 0).astype(np.uint8))


def dsb_split(root: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """(kind per id, tune ids, report ids), as the module's docstring says."""
    kinds = {path.stem: image_kind(read_image(path)) for path in sorted((root / "images").glob("*.png"))}
    tune: list[str] = []
    report: list[str] = []
    for kind in KINDS:
        ids = sorted(i for i, k in kinds.items() if k == kind)
        random.Random(2018).shuffle(ids)
        tune += ids[0::2]
        report += ids[1::2]
    return kinds, sorted(tune), sorted(report)


def general_sets(kinds: dict[str, str], tune: list[str], report: list[str]) -> tuple[list[str], list[str]]:
    """(training ids from the tune part, report ids from the report part)."""
    train = random.Random(0).sample(tune, GENERAL_TRAIN)
    shuffled = list(report)
    random.Random(2018).shuffle(shuffled)
    chosen = [i for i in shuffled if kinds[i] != "fluorescence"]
    chosen += [i for i in shuffled if kinds[i] == "fluorescence"][: max(0, GENERAL_REPORT - len(chosen))]
    return train, chosen


def yeast_split(root: Path) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(3 fine-tuning samples, 10 fine-tuning samples, held-out samples); masks 0/1 mother/2 daughter."""

    def sample(path: Path) -> Sample:
        return Sample(path.stem, read_image(path), np.array(Image.open(root / "masks" / path.name)).astype(np.uint8))

    paths = sorted(p for p in (root / "images").glob("*.png") if p.stem != "test-image")
    pool, held = paths[:-2], paths[-2:] + [root / "images" / "test-image.png"]
    ten = [sample(p) for p in pool]
    three = random.Random(3).sample(ten, 3)
    return three, ten, [sample(p) for p in held]


def plain_loop(
    samples: Sequence[Sample], n_classes: int, minutes: float, seed: int, crop: int = 256, batch_size: int = 8
) -> tuple[NetworkConfig, dict[str, torch.Tensor], dict]:
    """Train the plain baseline: (network spec, last weights, {"steps", "crops_per_s"})."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = NetworkConfig(n_classes=n_classes)
    network = build(spec)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    network.train()
    started, steps = time.monotonic(), 0
    while time.monotonic() - started < minutes * 60:
        images, masks = [], []
        for _ in range(batch_size):
            sample = samples[int(rng.integers(len(samples)))]
            image, mask = pad_to_at_least(sample.image, sample.mask, crop)
            top = rng.integers(mask.shape[0] - crop + 1)
            left = rng.integers(mask.shape[1] - crop + 1)
            image, mask = image[top : top + crop, left : left + crop], mask[top : top + crop, left : left + crop]
            if rng.random() < 0.5:
                image, mask = image[:, ::-1], mask[:, ::-1]
            if rng.random() < 0.5:
                image, mask = image[::-1], mask[::-1]
            images.append(normalize(np.ascontiguousarray(image)))
            masks.append(np.ascontiguousarray(mask)[None].astype(np.int64))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(torch.from_numpy(np.stack(images))), torch.from_numpy(np.stack(masks)))
        loss.backward()
        optimizer.step()
        steps += 1
    elapsed = time.monotonic() - started
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    return spec, state, {"steps": steps, "crops_per_s": round(steps * batch_size / elapsed, 2)}
