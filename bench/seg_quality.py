"""Few-shot segmentation quality on real data, against a plain baseline trained in the same run.

    python -m bench.seg_quality [--minutes M] [--data ../shared/data] [--threads N]

- DSB2018 nuclei, foreground vs background: train on 30 images (fixed, seeded choice), evaluate
  on a fixed held-out set of other images.
- Yeast, 3 classes (background, mother, daughter): train on the 12 non-test images, evaluate on
  `test-image.png` (the source project's validation image).

Ours: the backend's trainer (augmentation, Dice + cross-entropy, best-on-validation weights).
Baseline: the same network, trainer, data pipeline and time budget without augmentation,
cross-entropy only.
Ours and the baseline train at the same time, each in its own process with the same number of
torch threads, so both see the same machine load (on a shared machine, two runs one after the
other can differ by 30 % in steps). Each pair gets `--minutes` of wall time per budget listed
(default 2) and seed listed (default 0 1; a 2-minute run's score moves by up to 0.1 Dice from one
seed to the next, so one seed decides nothing): one pair after the other, ~10 minutes for the
defaults, ~30 for `--minutes 2 5`.
Prints one JSON line per figure and budget: value = ours, reference = baseline (means over the
seeds), ratio = ours / baseline; the per-seed values come along.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import emit
from segmentation.data import Sample, read_image
from segmentation.network import build_network
from segmentation.tiled_inference import segment_images
from segmentation.trainer import TrainConfig, class_scores, fit

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DSB_TRAIN, DSB_TEST = 30, 40


def dsb2018_samples(root: Path) -> tuple[list[Sample], list[Sample]]:
    """(30 training, 40 test) samples, foreground = instance label > 0; a fixed seeded choice."""
    ids = sorted(path.stem for path in (root / "images").glob("*.png"))
    random.Random(2018).shuffle(ids)

    def sample(image_id: str) -> Sample:
        labels = np.array(Image.open(root / "labels" / f"{image_id}.png"))
        return Sample(image_id, read_image(root / "images" / f"{image_id}.png"), (labels > 0).astype(np.uint8))

    return [sample(i) for i in ids[:DSB_TRAIN]], [sample(i) for i in ids[DSB_TRAIN : DSB_TRAIN + DSB_TEST]]


def yeast_samples(root: Path) -> tuple[list[Sample], list[Sample]]:
    """(12 training samples, [test-image]) with masks 0 background, 1 mother, 2 daughter."""

    def sample(path: Path) -> Sample:
        return Sample(path.stem, read_image(path), np.array(Image.open(root / "masks" / path.name)).astype(np.uint8))

    paths = sorted((root / "images").glob("*.png"))
    return [sample(p) for p in paths if p.stem != "test-image"], [sample(root / "images" / "test-image.png")]


def run(samples, test, labels, config: TrainConfig, threads: int | None = None) -> tuple[dict, dict]:
    """Train with `config`, return (scores on `test`, training metrics)."""
    if threads:
        torch.set_num_threads(threads)
    trained = fit(samples, labels, config)
    network = build_network(trained.network)
    network.load_state_dict(trained.state_dict)
    predictions = segment_images(network, [s.image for s in test], torch.device(config.device))
    scores = class_scores([s.mask for s in test], [p.mask for p in predictions], len(labels) + 1)
    return scores, trained.metrics


def run_pair(samples, test, labels, ours: TrainConfig, baseline: TrainConfig, threads: int | None):
    """Ours and the baseline trained concurrently in two processes: ((scores, metrics), (scores, metrics))."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited torch thread pool
    with context.Pool(2) as pool:
        jobs = [pool.apply_async(run, (samples, test, labels, config, threads)) for config in (ours, baseline)]
        return tuple(job.get() for job in jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seg_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--minutes",
        type=float,
        nargs="+",
        default=[2.0],
        help="training time per run; several values give figures at several budgets (e.g. 2 5)",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per training run (default 1)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1],
        help="training seeds (split, initialisation, crops); figures are means over them",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not (args.data / "dsb2018" / "images").is_dir():
        print(f"error: real data not found at {args.data}", file=sys.stderr)
        return 2
    if any(not m > 0 for m in args.minutes):
        parser.error("--minutes must be positive")
    machine = (
        f"{platform.machine()} {args.threads} torch thread(s) per run, ours and baseline concurrently, {args.device}"
    )
    started = time.monotonic()
    dsb_train, dsb_test = dsb2018_samples(args.data / "dsb2018")
    yeast_train, yeast_test = yeast_samples(args.data / "yeast")
    labels = ["mother", "daughter"]

    def mean(values):
        return float(np.mean([v or 0.0 for v in values]))

    def figures(train, test, labels, minutes, data) -> list[tuple[str, str, list[float], list[float], dict]]:
        """Per figure: (name, unit, ours per seed, baseline per seed, extra)."""
        ours_runs, base_runs = [], []
        for seed in args.seeds:
            ours = TrainConfig(minutes=minutes, device=args.device, seed=seed)
            baseline = TrainConfig(minutes=minutes, device=args.device, seed=seed, augment=False, loss="ce")
            (o_scores, o_metrics), (b_scores, b_metrics) = run_pair(train, test, labels, ours, baseline, args.threads)
            ours_runs.append((o_scores, o_metrics))
            base_runs.append((b_scores, b_metrics))
        extra = {
            "machine": machine,
            "data": data,
            "minutes": minutes,
            "seeds": args.seeds,
            "steps": [m["steps"] for _, m in ours_runs],
            "reference_steps": [m["steps"] for _, m in base_runs],
        }
        names = ["nucleus"] if len(labels) == 1 else labels
        rows = []
        for kind in ("dice", "iou"):
            rows.append(
                (f"mean_{kind}", kind, [mean(s[kind]) for s, _ in ours_runs], [mean(s[kind]) for s, _ in base_runs])
            )
            if kind == "dice" and len(labels) > 1:
                for index, label in enumerate(names):
                    rows.append(
                        (
                            f"{label}_dice",
                            kind,
                            [s[kind][index] or 0.0 for s, _ in ours_runs],
                            [s[kind][index] or 0.0 for s, _ in base_runs],
                        )
                    )
        return [(name, unit, o, b, extra) for name, unit, o, b in rows]

    def report(prefix, rows, rename=None):
        for name, unit, ours, base, extra in rows:
            figure = (rename or {}).get(name, f"{prefix}_{name}")
            emit(
                figure,
                float(np.mean(ours)),
                unit,
                float(np.mean(base)),
                **extra,
                values_per_seed=[round(v, 4) for v in ours],
                references_per_seed=[round(v, 4) for v in base],
            )

    for minutes in args.minutes:
        data = f"dsb2018: {len(dsb_train)} training images, {len(dsb_test)} held-out test images (seeded choice)"
        report(
            "dsb2018",
            figures(dsb_train, dsb_test, ["nucleus"], minutes, data),
            rename={"mean_dice": "dsb2018_fg_dice", "mean_iou": "dsb2018_fg_iou"},
        )
        data = f"yeast: {len(yeast_train)} training images, evaluated on test-image.png"
        report("yeast", figures(yeast_train, yeast_test, labels, minutes, data))
    print(f"seg_quality finished in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
