"""Time-bounded training with a held-out validation split and best-on-validation checkpoint.

`fit` trains a network on samples until the time budget is spent, evaluating on the validation
images after every epoch and keeping the weights that scored best (mean Dice over the labels).
`train` does the same and saves the result as a new version under MODEL_DIR.

Where a run starts (segmentation/families.py): a fresh U-Net (`model="unet"`), a pretrained
transformers model (`model="hf:<id>"`) or an earlier version (`init`). Whatever came pretrained
is frozen for the first `warmup_fraction` of the budget (only the new head learns, so its random
start does not wreck the pretrained features), then learns at `encoder_lr_factor` of the rate.
With a held-out split, a run stops early after `patience` validations without a better score. On a GPU the forward pass runs in mixed precision (bf16, or fp16 with loss scaling) and
the batch grows to what memory holds; on a CPU everything is fp32. Same code path for both.
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
from segmentation.families import NetworkSpec, check_model, initial_network
from segmentation.label_map import parse_label_map
from segmentation.network import DEFAULT_CHANNELS, NetworkConfig, build_loss
from segmentation.normalization import PER_IMAGE, Normalization
from segmentation.tiled_inference import autocast, iter_segmentations
from segmentation.versions import METRICS_FILE, VersionInfo, current_version, save_version

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
    channels: tuple[int, ...] = DEFAULT_CHANNELS  # of a fresh U-Net
    max_epochs: int | None = None  # None: as many as the time allows
    model: str = "unet"  # SEG_MODEL: "unet" or "hf:<Hub id or folder>"
    init: str | None = None  # start from this version folder or pretrained model instead of `model`
    allow_hub: bool = False  # SEG_ALLOW_HUB: pretrained models may be downloaded
    label_map: str = ""  # SEG_LABEL_MAP: which pretrained classes become which labels (their head rows)
    warmup_fraction: float = 0.1  # of the budget: pretrained weights frozen, the head learns
    encoder_lr_factor: float = 0.1  # pretrained weights learn at this fraction of the rate
    patience: int | None = 10  # validations without a better held-out score before stopping; None: never
    auto_batch: bool = True  # on a GPU, raise batch_size to what memory holds (at most 64)
    # Whole-image validation after an epoch is skipped while validating has taken more than this
    # share of the run (large validation images cost as much as many training steps); the last
    # epoch is always validated.
    max_validation_share: float = 0.15

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"channels": list(self.channels)}


def training_config(settings, device: str, project_dir: Path) -> TrainConfig:
    """A backend run's TrainConfig from Settings (TRAIN_MINUTES, VAL_FRACTION, SEG_MODEL,
    SEG_ALLOW_HUB, SEG_LABEL_MAP). It fine-tunes the current model: the project's current version
    when it is of SEG_MODEL's family (a U-Net with resize up-sampling, or the same hf source),
    else SEG_CHECKPOINT (a version folder or a pretrained model), else SEG_MODEL itself."""
    config = TrainConfig(
        minutes=settings.train_minutes,
        device=device,
        val_fraction=settings.val_fraction,
        model=settings.seg_model,
        allow_hub=settings.seg_allow_hub,
        label_map=settings.seg_label_map,
    )
    name = current_version(project_dir)
    if name and _same_family(VersionInfo.read(project_dir / name).network, settings.seg_model):
        return dataclasses.replace(config, init=str(project_dir / name))
    checkpoint = settings.seg_checkpoint
    if checkpoint and (checkpoint.startswith("hf:") or Path(checkpoint, METRICS_FILE).is_file()):
        return dataclasses.replace(config, init=checkpoint)
    if checkpoint and Path(checkpoint, "config.json").is_file():
        return dataclasses.replace(config, init="hf:" + checkpoint)
    return config


def _same_family(network: NetworkSpec, model: str) -> bool:
    """Whether a saved network continues SEG_MODEL: older U-Nets (transposed up-sampling, whose
    masks show a checkerboard) and other pretrained sources start over from SEG_MODEL instead."""
    if isinstance(network, NetworkConfig):
        return model == "unet" and network.upsample == "resize"
    return model.removeprefix("hf:") == network.source


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
    network: NetworkSpec
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
    normalization: Normalization = PER_IMAGE,
) -> dict:
    """Whole-image validation: {"dice": [...], "iou": [...], "mean_dice": x, "mean_iou": y}.
    Images are read and segmented one after the other (stored samples: from disk)."""
    tally = ClassTally(n_classes)
    images = (sample.image for sample in samples)
    segmentations = iter_segmentations(
        network, images, device, size_multiple=size_multiple, normalization=normalization
    )
    for sample, segmentation in zip(samples, segmentations, strict=True):
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
    """Train a network (see the module's docstring for where it starts) on `samples` (class k =
    labels[k-1]) within config.minutes.

    Epochs of `steps_per_epoch` steps until the budget is spent (or `should_stop()`, or `patience`
    validations without a better held-out score), scored on the validation images (while that
    takes at most `max_validation_share` of the time); the best-scoring weights are returned.
    """
    run = _prepare(samples, labels, config, progress, should_stop)
    while config.max_epochs is None or run.epoch < config.max_epochs:
        _train_epoch(run)
        last = run.out_of_time() or run.epoch == config.max_epochs
        if last or run.validation_s <= config.max_validation_share * run.elapsed_s():
            _score_epoch(run)
        if last or run.stalled():
            break
    return _result(run, labels)


@dataclass
class _Run:
    """One training run: what `_prepare` builds, and how far the epochs have gone."""

    config: TrainConfig
    device: str
    network_config: NetworkSpec
    network: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling: on for fp16 autocast only
    pretrained: list[torch.nn.Parameter]  # frozen during the warm-up
    init: str  # "scratch", the pretrained source or the version it started from
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
    validation_s: float = 0.0  # spent validating so far
    validations_since_best: int = 0

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def out_of_time(self) -> bool:
        return self.elapsed_s() >= self.budget_s or bool(self.should_stop and self.should_stop())

    def best_val_score(self) -> float | None:
        return self.best_scores["mean_dice"] if self.best_scores else None

    def stalled(self) -> bool:
        """`patience` validations without a better held-out score (never when validating on training)."""
        patience = self.config.patience
        return patience is not None and self.validated_on == "held_out" and self.validations_since_best >= patience

    def warming_up(self) -> bool:
        return bool(self.pretrained) and self.elapsed_s() < self.config.warmup_fraction * self.budget_s


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
    if not config.minutes > 0:
        raise ValueError(f"the training budget must be positive, got {config.minutes} minutes (TRAIN_MINUTES)")
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    start = initial_network(
        check_model(config.model),
        labels,
        config.init,
        config.allow_hub,
        tuple(config.channels),
        parse_label_map(config.label_map),
    )
    network_config, network = start.spec, start.network.to(device)
    loss_fn = build_loss(config.loss)
    pretrained = [p for name, p in network.named_parameters() if name in start.pretrained_keys]
    fresh = [p for name, p in network.named_parameters() if name not in start.pretrained_keys]
    groups = [{"params": fresh, "base_lr": config.learning_rate}]
    if pretrained:
        groups.append({"params": pretrained, "base_lr": config.learning_rate * config.encoder_lr_factor})
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=_needs_loss_scaling(device))

    train_samples, val_samples = split_samples(samples, config.val_fraction, config.seed)
    validated_on = "held_out" if val_samples else "training"
    # Crops never larger than the largest image (rounded up to the network's multiple): small
    # images would otherwise be padded into mostly repeated pixels, at 16x the cost.
    largest = max(max(s.shape) for s in train_samples)
    multiple = network_config.size_multiple
    crop_size = max(min(config.crop_size, -(-largest // multiple) * multiple), multiple)
    batch_size = config.batch_size
    if config.auto_batch and torch.device(device).type == "cuda":
        batch_size = gpu_batch_size(network, loss_fn, crop_size, network_config.n_classes, device, batch_size)
        log.info("batch size %d (what GPU memory holds, at most 64)", batch_size)
    dataset = CropDataset(
        train_samples,
        crop_size=crop_size,
        length=config.steps_per_epoch * batch_size,
        augment=build_augmentation(seed=config.seed) if config.augment else None,
        seed=config.seed,
        normalization=network_config.normalization,
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    return _Run(
        config=config,
        device=device,
        network_config=network_config,
        network=network,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scaler=scaler,
        pretrained=pretrained,
        init=start.source,
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
        warming_up = run.warming_up()
        for parameter in run.pretrained:
            parameter.requires_grad_(not warming_up)
        for group in run.optimizer.param_groups:
            group["lr"] = _learning_rate(group["base_lr"], run.elapsed_s() / run.budget_s)
        run.optimizer.zero_grad(set_to_none=True)
        with autocast(run.device):
            # channels-last: 1.7x faster convolutions on a CPU (oneDNN), the layout a plain loop gets by chance
            logits = run.network(images.to(run.device, memory_format=torch.channels_last))
        loss = run.loss_fn(logits.float(), masks.to(run.device))
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.step += 1
        run.last_loss = float(loss.detach())
        _report(run)
        if run.out_of_time():
            break


def _score_epoch(run: _Run) -> None:
    """Validate the epoch's weights on whole images; keep them when they score best so far."""
    spec = run.network_config
    started = time.monotonic()
    scores = evaluate(run.network, run.val_samples, spec.n_classes, run.device, spec.size_multiple, spec.normalization)
    run.validation_s += time.monotonic() - started
    if run.best_scores is None or scores["mean_dice"] >= run.best_scores["mean_dice"]:
        run.best_state = {k: v.detach().cpu().clone() for k, v in run.network.state_dict().items()}
        run.best_scores, run.best_epoch = scores, run.epoch
        run.validations_since_best = 0
    else:
        run.validations_since_best += 1
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
        "batch_size": run.loader.batch_size,
        "init": run.init,
        "best_epoch": run.best_epoch,
        "epochs": run.epoch,
        "steps": run.step,
        "final_loss": run.last_loss,
        "train_seconds": round(run.elapsed_s(), 2),
        "validation_seconds": round(run.validation_s, 2),
    }
    return TrainedNetwork(state_dict=run.best_state, network=run.network_config, metrics=metrics)


def _needs_loss_scaling(device: str) -> bool:
    """fp16 autocast (a GPU without bf16) needs loss scaling; bf16 and fp32 do not."""
    return torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported()


def gpu_batch_size(
    network: torch.nn.Module, loss_fn: torch.nn.Module, crop: int, n_classes: int, device: str, minimum: int
) -> int:
    """The batch size a training step fits in: a step of 2 crops is measured (peak memory), and the
    batch takes half the free memory, between `minimum` and 64."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    images = torch.zeros((2, 3, crop, crop), device=device)
    masks = torch.zeros((2, 1, crop, crop), dtype=torch.int64, device=device)
    with autocast(device):
        logits = network(images)
    loss_fn(logits.float(), masks.clamp_(max=n_classes - 1)).backward()
    per_crop = max((torch.cuda.max_memory_allocated(device) - before) / 2, 1)
    network.zero_grad(set_to_none=True)
    del images, masks, logits
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(64, max(minimum, 0.5 * free // per_crop)))


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
