"""Time-bounded training with a held-out validation split and best-on-validation checkpoint.

`fit` trains a fresh U-Net on samples until the time budget is spent, evaluating on the
validation images after every epoch and keeping the weights that scored best (mean Dice over
the labels). `train` does the same and saves the result as a new version under MODEL_DIR.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from segmentation.augment import build_augmentation
from segmentation.data import AnySample, CropDataset, split_samples
from segmentation.tiled_inference import iter_segmentations
from segmentation.network import DEFAULT_CHANNELS, NetworkConfig, build_loss, build_network, resolve_device
from segmentation.versions import VersionInfo, save_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How one training run goes. `minutes` bounds the training loop (validation included)."""

    minutes: float = 5.0
    device: str = "auto"
    val_fraction: float = 0.2
    seed: int = 0
    crop_size: int = 256
    batch_size: int = 8
    learning_rate: float = 2e-3
    steps_per_epoch: int = 20
    augment: bool = True
    loss: str = "dice_ce"
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    max_epochs: int | None = None  # None: as many as the time allows

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"channels": list(self.channels)}


@dataclass(frozen=True)
class Progress:
    """Reported after every step (and with `validated=True` after each validation)."""

    epoch: int
    step: int
    loss: float
    elapsed_s: float
    budget_s: float
    val_score: float | None = None  # mean foreground Dice of the latest validation
    best_val_score: float | None = None
    validated: bool = False


@dataclass
class TrainedNetwork:
    """The best weights of a run (CPU tensors), how to rebuild the network, and the run's metrics."""

    state_dict: dict[str, torch.Tensor]
    network: NetworkConfig
    metrics: dict = field(default_factory=dict)


def class_scores(truths: Sequence[np.ndarray], predictions: Sequence[np.ndarray], n_classes: int) -> dict:
    """Dice and IoU per foreground class, pooled over all pixels of all images.

    truths / predictions: HxW uint8 class-index masks, pairwise the same shape.
    Returns {"dice": [d_1..d_K], "iou": [i_1..i_K]}; a class absent from both truth and
    prediction everywhere gets None (nothing to score).
    """
    tally = ClassTally(n_classes)
    for truth, predicted in zip(truths, predictions):
        tally.add(truth, predicted)
    return tally.scores()


class ClassTally:
    """Pixel counts per class (truth, predicted, both), added one image at a time."""

    def __init__(self, n_classes: int):
        self.n_classes = n_classes
        self.intersection = np.zeros(n_classes, dtype=np.int64)
        self.truth_area = np.zeros(n_classes, dtype=np.int64)
        self.predicted_area = np.zeros(n_classes, dtype=np.int64)

    def add(self, truth: np.ndarray, predicted: np.ndarray) -> None:
        """truth, predicted: HxW uint8 class-index masks of one image."""
        n = self.n_classes
        truth = np.asarray(truth)
        self.truth_area += np.bincount(truth.ravel(), minlength=n)[:n]
        self.predicted_area += np.bincount(predicted.ravel(), minlength=n)[:n]
        agree = truth[truth == predicted]
        self.intersection += np.bincount(agree.ravel(), minlength=n)[:n]

    def scores(self) -> dict:
        """{"dice": [d_1..d_K], "iou": [i_1..i_K]}, None for a class absent everywhere."""
        dice, iou = [], []
        for k in range(1, self.n_classes):
            union = self.truth_area[k] + self.predicted_area[k] - self.intersection[k]
            if union == 0:
                dice.append(None)
                iou.append(None)
            else:
                dice.append(float(2 * self.intersection[k] / (self.truth_area[k] + self.predicted_area[k])))
                iou.append(float(self.intersection[k] / union))
        return {"dice": dice, "iou": iou}


def _mean(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else 0.0


def evaluate(
    network: torch.nn.Module, samples: Sequence[AnySample], n_classes: int, device: torch.device,
    size_multiple: int = 16,
) -> dict:
    """Whole-image validation: {"dice": [...], "iou": [...], "mean_dice": x, "mean_iou": y}.
    Images are read and segmented one after the other (stored samples: from disk)."""
    tally = ClassTally(n_classes)
    images = (sample.image for sample in samples)
    for sample, segmentation in zip(samples, iter_segmentations(network, images, device, size_multiple=size_multiple)):
        tally.add(sample.mask, segmentation.mask)
    scores = tally.scores()
    return scores | {"mean_dice": _mean(scores["dice"]), "mean_iou": _mean(scores["iou"])}


def _learning_rate(base: float, fraction_done: float) -> float:
    """Cosine decay over the time budget, down to 5 % of the base rate."""
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(fraction_done, 1.0))))


def fit(
    samples: Sequence[AnySample],
    labels: Sequence[str],
    config: TrainConfig = TrainConfig(),
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainedNetwork:
    """Train a fresh network on `samples` (class k = labels[k-1]) within config.minutes."""
    if not samples:
        raise ValueError("no usable training samples")
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    n_classes = len(labels) + 1
    network_config = NetworkConfig(n_classes=n_classes, channels=tuple(config.channels))
    network = build_network(network_config).to(device)
    loss_fn = build_loss(config.loss)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-4)

    train_samples, val_samples = split_samples(samples, config.val_fraction, config.seed)
    validated_on = "held_out" if val_samples else "training"
    if not val_samples:
        val_samples = train_samples
    # Crops never larger than the largest image (rounded up to the network's multiple): small
    # images would otherwise be padded into mostly repeated pixels, at 16x the cost.
    largest = max(max(s.shape) for s in train_samples)
    multiple = network_config.size_multiple
    crop_size = min(config.crop_size, -(-largest // multiple) * multiple)
    dataset = CropDataset(
        train_samples,
        crop_size=crop_size,
        length=config.steps_per_epoch * config.batch_size,
        augment=build_augmentation(seed=config.seed) if config.augment else None,
        seed=config.seed,
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, num_workers=0)

    if not config.minutes > 0:
        raise ValueError(f"the training budget must be positive, got {config.minutes} minutes (TRAIN_MINUTES)")
    budget_s = config.minutes * 60.0
    started = time.monotonic()
    best_state, best_scores, best_epoch = None, None, 0
    step, epoch, last_loss = 0, 0, float("nan")

    def out_of_time() -> bool:
        return time.monotonic() - started >= budget_s or bool(should_stop and should_stop())

    while config.max_epochs is None or epoch < config.max_epochs:
        epoch += 1
        network.train()
        for images, masks in loader:
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config.learning_rate, (time.monotonic() - started) / budget_s)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(network(images.to(device)), masks.to(device))
            loss.backward()
            optimizer.step()
            step += 1
            last_loss = float(loss.detach())
            if progress:
                progress(Progress(epoch, step, last_loss, time.monotonic() - started, budget_s,
                                  best_val_score=best_scores["mean_dice"] if best_scores else None))
            if out_of_time():
                break
        scores = evaluate(network, val_samples, n_classes, device, network_config.size_multiple)
        if best_scores is None or scores["mean_dice"] >= best_scores["mean_dice"]:
            best_state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
            best_scores, best_epoch = scores, epoch
        log.info("epoch %d step %d loss %.4f val mean dice %.4f", epoch, step, last_loss, scores["mean_dice"])
        if progress:
            progress(Progress(epoch, step, last_loss, time.monotonic() - started, budget_s,
                              val_score=scores["mean_dice"], best_val_score=best_scores["mean_dice"], validated=True))
        if out_of_time():
            break

    metrics = {
        "val_dice": dict(zip(labels, best_scores["dice"])),
        "val_iou": dict(zip(labels, best_scores["iou"])),
        "val_mean_dice": best_scores["mean_dice"],
        "val_mean_iou": best_scores["mean_iou"],
        "validated_on": validated_on,
        "n_train": len(train_samples),
        "n_val": len(val_samples) if validated_on == "held_out" else 0,
        "train_names": [s.name for s in train_samples],
        "val_names": [s.name for s in val_samples] if validated_on == "held_out" else [],
        "crop_size": crop_size,
        "best_epoch": best_epoch,
        "epochs": epoch,
        "steps": step,
        "final_loss": last_loss,
        "train_seconds": round(time.monotonic() - started, 2),
    }
    return TrainedNetwork(state_dict=best_state, network=network_config, metrics=metrics)


def train(
    samples: Sequence[AnySample],
    labels: Sequence[str],
    out_dir: Path,
    config: TrainConfig | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    make_current: bool = True,
    extra_training: dict | None = None,
    **overrides,
) -> VersionInfo:
    """Fit on `samples` and save the best weights as a new version in `out_dir` (MODEL_DIR).

    `overrides` replace TrainConfig fields, e.g. train(..., minutes=2, device="cpu", seed=1).
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    trained = fit(samples, labels, config, progress=progress, should_stop=should_stop)
    return save_version(
        out_dir,
        trained.state_dict,
        labels=tuple(labels),
        network=trained.network,
        metrics=trained.metrics,
        training=config.to_json() | (extra_training or {}),
        make_current=make_current,
    )
