"""Segmentation quality on real data, against a plain baseline trained in the same run.

    python -m bench.seg_quality [--figures generalisation transfer fewshot] [--general-minutes 2.5]
        [--pretrain-minutes 3] [--finetune-minutes 1] [--minutes M ...] [--threads N] [--data ../shared/data]

Figures (default: generalisation and transfer, ~12 minutes on 2 cores; splits in bench/seg_protocol.py):
- generalisation: DSB2018 split by image kind into a tune part and a report part. The backend's
  trainer and a plain loop (the same U-Net, flips + uniform random crops, DiceCE, Adam, last
  weights) train concurrently for --general-minutes on the same 30 tune-part images; both are
  scored on 100 report-part images (all its bright-field and H&E ones): pooled nucleus IoU, IoU per
  image kind (fluorescence, bright-field, H&E), and training crops per second.
- transfer: the offline CLI (`python -m segmentation.train`) pretrains a U-Net on the DSB2018 tune
  part for --pretrain-minutes; then `--init` fine-tuning on 3 and on 10 yeast images against the
  same network from scratch (same trainer, same time, concurrently), IoU per class (mother,
  daughter) on 3 held-out yeast images.
- fewshot: DSB2018 nuclei (30 training images, 40 held out) and yeast (12 training images,
  test-image.png), ours against the same trainer without augmentation and with cross-entropy
  only, per seed (--seeds) and budget (--minutes): one pair after the other, ~10 minutes.
The two arms of a figure train at the same time, each in its own process with the same number of
torch threads, so both see the same machine load (on a shared machine, two runs one after the
other can differ by 30 % in steps).
Prints one JSON line per figure: value = ours (fine-tuned for transfer), reference = the
baseline, ratio = value / reference; machine, load average, data and steps come along.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import emit
from bench.seg_protocol import KINDS, YEAST_LABELS, dsb_sample, dsb_split, general_sets, plain_loop, yeast_split
from segmentation.data import Sample, read_image
from segmentation.families import NetworkSpec, build
from segmentation.tiled_inference import iter_segmentations, segment_images
from segmentation.trainer import ClassTally, TrainConfig, class_scores, fit

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
    network = build(trained.network)
    network.load_state_dict(trained.state_dict)
    spec = trained.network
    predictions = segment_images(
        network,
        [s.image for s in test],
        torch.device(config.device),
        size_multiple=spec.size_multiple,
        normalization=spec.normalization,
    )
    scores = class_scores([s.mask for s in test], [p.mask for p in predictions], len(labels) + 1)
    return scores, trained.metrics


def run_pair(samples, test, labels, ours: TrainConfig, baseline: TrainConfig, threads: int | None):
    """Ours and the baseline trained concurrently in two processes: ((scores, metrics), (scores, metrics))."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited torch thread pool
    with context.Pool(2) as pool:
        jobs = [pool.apply_async(run, (samples, test, labels, config, threads)) for config in (ours, baseline)]
        return tuple(job.get() for job in jobs)


def fewshot(args: argparse.Namespace) -> None:
    """The few-shot figures: ours against the same trainer without augmentation, per seed and budget."""
    machine = (
        f"{platform.machine()} {args.threads} torch thread(s) per run, ours and baseline concurrently, {args.device}"
    )
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


def score_by_kind(spec: NetworkSpec, state: dict, test: list[Sample], kinds: list[str], device: str) -> dict:
    """{"pooled" | kind: IoU per foreground class} of a network on `test` (kinds: one per sample)."""
    network = build(spec)
    network.load_state_dict(state)
    tallies = {name: ClassTally(spec.n_classes) for name in ("pooled", *sorted(set(kinds)))}
    images = (sample.image for sample in test)
    segmentations = iter_segmentations(
        network, images, torch.device(device), size_multiple=spec.size_multiple, normalization=spec.normalization
    )
    for sample, kind, segmentation in zip(test, kinds, segmentations, strict=True):
        tallies["pooled"].add(sample.mask, segmentation.mask)
        tallies[kind].add(sample.mask, segmentation.mask)
    return {name: tally.scores()["iou"] for name, tally in tallies.items()}


def general_arm(
    arm: str, train: list[Sample], test: list[Sample], kinds: list[str], minutes: float, threads: int, device: str
):
    """Train one arm ("ours": the backend's trainer; "plain": the plain loop) on `train` and score
    it on `test` by kind: (IoU by kind, {"steps", "crops_per_s"})."""
    torch.set_num_threads(threads)
    if arm == "ours":
        trained = fit(train, ["nucleus"], TrainConfig(minutes=minutes, device=device, seed=0))
        metrics = trained.metrics
        crops = metrics["steps"] * metrics["batch_size"] / max(metrics["train_seconds"], 1e-9)
        spec, state, info = (
            trained.network,
            trained.state_dict,
            {"steps": metrics["steps"], "crops_per_s": round(crops, 2)},
        )
    else:
        spec, state, info = plain_loop(train, 2, minutes, seed=0)
    return score_by_kind(spec, state, test, kinds, device), info


def generalisation(args: argparse.Namespace, machine: str) -> None:
    """Ours and the plain loop trained concurrently on 30 tune-part images, scored on the report part."""
    root = args.data / "dsb2018"
    kinds, tune, report = dsb_split(root)
    train_ids, report_ids = general_sets(kinds, tune, report)
    train = [dsb_sample(root, i) for i in train_ids]
    test = [dsb_sample(root, i) for i in report_ids]
    test_kinds = [kinds[i] for i in report_ids]
    load = os.getloadavg()[0]
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        jobs = [
            pool.apply_async(
                general_arm, (arm, train, test, test_kinds, args.general_minutes, args.threads, args.device)
            )
            for arm in ("ours", "plain")
        ]
        (ours, ours_info), (plain, plain_info) = (job.get() for job in jobs)
    extra = {
        "machine": machine,
        "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
        "minutes": args.general_minutes,
        "data": f"dsb2018: {len(train)} training images from the tune part, {len(test)} report-part images",
        "train_kinds": {k: [kinds[i] for i in train_ids].count(k) for k in KINDS},
        "report_kinds": {k: test_kinds.count(k) for k in KINDS},
        "reference_is": "plain loop: same U-Net, flips + random crops, DiceCE, Adam, same time",
    }
    for name in ("pooled", *KINDS):
        if name in ours:
            figure = "dsb2018_general_iou" if name == "pooled" else f"dsb2018_general_iou_{name}"
            emit(figure, ours[name][0] or 0.0, "iou", plain[name][0] or 0.0, **extra)
    emit(
        "seg_train_crops_per_s",
        ours_info["crops_per_s"],
        "crops/s",
        plain_info["crops_per_s"],
        **extra,
        steps=ours_info["steps"],
        reference_steps=plain_info["steps"],
        note="ours: whole run, validation included",
    )


def pretrain(args: argparse.Namespace, work: Path) -> Path:
    """Pretrain through the offline CLI on the DSB2018 tune part: the new version's folder."""
    root = args.data / "dsb2018"
    kinds, tune, _ = dsb_split(root)
    images, masks = work / "images", work / "masks"
    images.mkdir()
    masks.mkdir()
    for image_id in tune:
        (images / f"{image_id}.png").symlink_to((root / "images" / f"{image_id}.png").resolve())
        labels = np.array(Image.open(root / "labels" / f"{image_id}.png"))
        Image.fromarray((labels > 0).astype(np.uint8)).save(masks / f"{image_id}.png")
    command = [
        sys.executable,
        "-m",
        "segmentation.train",
        "--images",
        str(images),
        "--masks",
        str(masks),
        "--out",
        str(work / "models"),
        "--labels",
        "nucleus",
        "--minutes",
        str(args.pretrain_minutes),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, timeout=args.pretrain_minutes * 60 + 600
    )
    if done.returncode != 0:
        raise RuntimeError(f"pretraining failed: {done.stderr[-2000:]}")
    return Path(json.loads(done.stdout.strip().splitlines()[-1])["path"])


def transfer(args: argparse.Namespace, machine: str) -> None:
    """Fine-tune the DSB2018-pretrained U-Net (--init) on 3 and 10 yeast images against the same
    network from scratch, trained concurrently for the same time, scored on held-out yeast images."""
    three, ten, held = yeast_split(args.data / "yeast")
    with tempfile.TemporaryDirectory() as work:
        started = time.monotonic()
        pretrained = pretrain(args, Path(work))
        pretrain_s = time.monotonic() - started
        for samples in (three, ten):
            load = os.getloadavg()[0]
            init = TrainConfig(minutes=args.finetune_minutes, device=args.device, init=str(pretrained))
            scratch = TrainConfig(minutes=args.finetune_minutes, device=args.device)
            (tuned, tuned_metrics), (fresh, fresh_metrics) = run_pair(
                samples, held, list(YEAST_LABELS), init, scratch, args.threads
            )
            extra = {
                "machine": machine,
                "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
                "minutes": args.finetune_minutes,
                "pretrain_minutes": args.pretrain_minutes,
                "pretrain_wall_s": round(pretrain_s),
                "data": f"yeast: fine-tuned on {[s.name for s in samples]}, held out {[s.name for s in held]}; "
                "pretrained on the 205-image DSB2018 tune part",
                "reference_is": "same U-Net from scratch, same trainer and time",
                "steps": tuned_metrics["steps"],
                "reference_steps": fresh_metrics["steps"],
            }
            ious, references = tuned["iou"], fresh["iou"]
            for index, label in enumerate(YEAST_LABELS):
                emit(
                    f"yeast_transfer{len(samples)}_iou_{label}",
                    ious[index] or 0.0,
                    "iou",
                    references[index] or 0.0,
                    **extra,
                )
            emit(
                f"yeast_transfer{len(samples)}_mean_iou",
                float(np.mean([v or 0.0 for v in ious])),
                "iou",
                float(np.mean([v or 0.0 for v in references])),
                **extra,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seg_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--figures",
        nargs="+",
        choices=("generalisation", "transfer", "fewshot"),
        default=["generalisation", "transfer"],
        help="which figures (default generalisation transfer, ~12 minutes on 2 cores)",
    )
    parser.add_argument("--general-minutes", type=float, default=2.5, help="training time per generalisation arm")
    parser.add_argument("--pretrain-minutes", type=float, default=3.0, help="DSB2018 pretraining time (transfer)")
    parser.add_argument("--finetune-minutes", type=float, default=1.0, help="time per fine-tune / scratch run")
    parser.add_argument(
        "--minutes",
        type=float,
        nargs="+",
        default=[2.0],
        help="fewshot: training time per run; several values give figures at several budgets (e.g. 2 5)",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per training run (default 1)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1],
        help="fewshot: training seeds (split, initialisation, crops); figures are means over them",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not (args.data / "dsb2018" / "images").is_dir():
        print(f"error: real data not found at {args.data}", file=sys.stderr)
        return 2
    budgets = [*args.minutes, args.general_minutes, args.pretrain_minutes, args.finetune_minutes]
    if any(not m > 0 for m in budgets):
        parser.error("every time budget must be positive")
    machine = f"{platform.machine()} {os.cpu_count()} cores, {args.threads} torch thread(s) per run, arms concurrently, {args.device}"
    started = time.monotonic()
    if "generalisation" in args.figures:
        generalisation(args, machine)
    if "transfer" in args.figures:
        transfer(args, machine)
    if "fewshot" in args.figures:
        fewshot(args)
    print(f"seg_quality finished in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
