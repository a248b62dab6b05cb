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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from backends.devices import resolve_device
from segmentation.augment import build_augmentation
from segmentation.data import AnySample, CropDataset, split_samples
from segmentation.network import DEFAULT_CHANNELS, NetworkConfig, build_loss, build_network
from segmentation.tiled_inference import iter_segmentations
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
    for truth, predicted in zip(truths, predictions, strict=True):
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
        dice: list[float | None] = []
        iou: list[float | None] = []
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
    network: torch.nn.Module,
    samples: Sequence[AnySample],
    n_classes: int,
    device: torch.device | str,
    size_multiple: int = 16,
) -> dict:
    """Whole-image validation: {"dice": [...], "iou": [...], "mean_dice": x, "mean_iou": y}.
    Images are read and segmented one after the other (stored samples: from disk)."""
    tally = ClassTally(n_classes)
    images = (sample.image for sample in samples)
    for sample, segmentation in zip(
        samples, iter_segmentations(network, images, device, size_multiple=size_multiple), strict=True
    ):
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
    """Train a fresh network on `samples` (class k = labels[k-1]) within config.minutes.

    Epochs of `steps_per_epoch` steps until the budget is spent (or `should_stop()`), each scored
    on the validation images; the best-scoring weights are returned.
    """
    run = _prepare(samples, labels, config, progress, should_stop)
    while config.max_epochs is None or run.epoch < config.max_epochs:
        _train_epoch(run)
        _score_epoch(run)
        if run.out_of_time():
            break
    return _result(run, labels)


@dataclass
class _Run:
    """One training run: what `_prepare` builds, and how far the epochs have gone."""

    config: TrainConfig
    device: str
    network_config: NetworkConfig
    network: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    train_samples: list[AnySample]
    val_samples: list[AnySample]  # the training samples when nothing is held out
    validated_on: str  # "held_out" | "training"
    crop_size: int
    budget_s: float
    progress: Callable[[Progress], None] | None
    should_stop: Callable[[], bool] | None
    started: float  # time.monotonic() when the first step starts
    epoch: int = 0
    step: int = 0
    last_loss: float = float("nan")
    best_state: dict[str, torch.Tensor] | None = None
    best_scores: dict | None = None
    best_epoch: int = 0

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def out_of_time(self) -> bool:
        return self.elapsed_s() >= self.budget_s or bool(self.should_stop and self.should_stop())

    def best_val_score(self) -> float | None:
        return self.best_scores["mean_dice"] if self.best_scores else None


def _prepare(
    samples: Sequence[AnySample],
    labels: Sequence[str],
    config: TrainConfig,
    progress: Callable[[Progress], None] | None,
    should_stop: Callable[[], bool] | None,
) -> _Run:
    """Seed, build the network, loss and optimiser, split the samples and make the crop loader."""
    if not samples:
        raise ValueError("no usable training samples")
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    network_config = NetworkConfig(n_classes=len(labels) + 1, channels=tuple(config.channels))
    network = build_network(network_config).to(device)
    loss_fn = build_loss(config.loss)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-4)

    train_samples, val_samples = split_samples(samples, config.val_fraction, config.seed)
    validated_on = "held_out" if val_samples else "training"
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
    return _Run(
        config=config,
        device=device,
        network_config=network_config,
        network=network,
        loss_fn=loss_fn,
        optimizer=optimizer,
        loader=loader,
        train_samples=train_samples,
        val_samples=val_samples or train_samples,
        validated_on=validated_on,
        crop_size=crop_size,
        budget_s=config.minutes * 60.0,
        progress=progress,
        should_stop=should_stop,
        started=time.monotonic(),
    )


def _train_epoch(run: _Run) -> None:
    """One pass over the crop loader (cut short when the time is up), reporting every step."""
    run.epoch += 1
    run.network.train()
    for images, masks in run.loader:
        for group in run.optimizer.param_groups:
            group["lr"] = _learning_rate(run.config.learning_rate, run.elapsed_s() / run.budget_s)
        run.optimizer.zero_grad(set_to_none=True)
        loss = run.loss_fn(run.network(images.to(run.device)), masks.to(run.device))
        loss.backward()
        run.optimizer.step()
        run.step += 1
        run.last_loss = float(loss.detach())
        _report(run)
        if run.out_of_time():
            break


def _score_epoch(run: _Run) -> None:
    """Validate the epoch's weights on whole images; keep them when they score best so far."""
    n_classes = run.network_config.n_classes
    scores = evaluate(run.network, run.val_samples, n_classes, run.device, run.network_config.size_multiple)
    if run.best_scores is None or scores["mean_dice"] >= run.best_scores["mean_dice"]:
        run.best_state = {k: v.detach().cpu().clone() for k, v in run.network.state_dict().items()}
        run.best_scores, run.best_epoch = scores, run.epoch
    log.info("epoch %d step %d loss %.4f val mean dice %.4f", run.epoch, run.step, run.last_loss, scores["mean_dice"])
    _report(run, val_score=scores["mean_dice"], validated=True)


def _report(run: _Run, val_score: float | None = None, validated: bool = False) -> None:
    """Hand the run's Progress to its callback: after every step, and after each validation."""
    if run.progress:
        progress = Progress(
            run.epoch,
            run.step,
            run.last_loss,
            run.elapsed_s(),
            run.budget_s,
            val_score,
            run.best_val_score(),
            validated,
        )
        run.progress(progress)


def _result(run: _Run, labels: Sequence[str]) -> TrainedNetwork:
    """The best weights and the run's metrics (what a version's metrics.json records)."""
    best = run.best_scores
    if best is None or run.best_state is None:
        raise ValueError(f"no epoch was trained (max_epochs={run.config.max_epochs})")
    held_out = run.validated_on == "held_out"
    metrics = {
        "val_dice": dict(zip(labels, best["dice"], strict=True)),
        "val_iou": dict(zip(labels, best["iou"], strict=True)),
        "val_mean_dice": best["mean_dice"],
        "val_mean_iou": best["mean_iou"],
        "validated_on": run.validated_on,
        "n_train": len(run.train_samples),
        "n_val": len(run.val_samples) if held_out else 0,
        "train_names": [s.name for s in run.train_samples],
        "val_names": [s.name for s in run.val_samples] if held_out else [],
        "crop_size": run.crop_size,
        "best_epoch": run.best_epoch,
        "epochs": run.epoch,
        "steps": run.step,
        "final_loss": run.last_loss,
        "train_seconds": round(run.elapsed_s(), 2),
    }
    return TrainedNetwork(state_dict=run.best_state, network=run.network_config, metrics=metrics)


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
