"""Offline training from an exported dataset.

    python -m segmentation.train --images DIR --masks DIR --out MODEL_DIR [--minutes M] [--labels a,b,...]
        [--model unet | hf:<Hub id or folder>] [--init VERSION_DIR | hf:<id> | save_pretrained folder]

Each mask is a PNG with the same file stem as its image; pixel value k is the k-th label and
0 is background. Images without a mask (and masks without an image) are listed and skipped.
The trained model becomes a new version under MODEL_DIR (and its current one). --init starts
from an earlier model (a version folder this trainer wrote, of any family, or a pretrained model),
so a lab can pretrain on its own archive and fine-tune per project.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from segmentation.data import load_pair, pair_files, read_mask
from segmentation.families import check_model
from segmentation.label_map import parse_label_map
from segmentation.trainer import Progress, TrainConfig, train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m segmentation.train",
        description="Train a segmentation model (U-Net or pretrained) on image/mask pairs and save a new version.",
    )
    parser.add_argument("--images", type=Path, required=True, help="folder of images (png, jpg, tif, ...)")
    parser.add_argument(
        "--masks", type=Path, required=True, help="folder of class-index PNG masks, same file stems as the images"
    )
    parser.add_argument("--out", type=Path, required=True, help="MODEL_DIR: the new version is saved under it")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time budget (default 5)")
    parser.add_argument(
        "--labels",
        default="",
        help="comma-separated label names, pixel value k = k-th label "
        "(default: class1..classK from the largest mask value)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--model", default="unet", help="unet (default, from scratch) or hf:<Hub id or folder>")
    parser.add_argument(
        "--init", default=None, help="start from this version folder, hf:<Hub id> or save_pretrained folder"
    )
    parser.add_argument(
        "--label-map", default="", help='pretrained classes -> labels (their head rows carry over), "Pants=Trousers"'
    )
    parser.add_argument("--allow-hub", action="store_true", help="a pretrained model may be downloaded from the Hub")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction of images (default 0.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop-size", type=int, default=256, help="training crop side in pixels (multiple of 16)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="stop after this many epochs (of 20 steps) even if time is left (default: use the time)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is faster on a busy machine)",
    )
    return parser.parse_args(argv)


def labels_for(args: argparse.Namespace, mask_paths: list[Path]) -> list[str]:
    if args.labels:
        return [label.strip() for label in args.labels.split(",") if label.strip()]
    largest = max((int(read_mask(path).max(initial=0)) for path in mask_paths), default=0)
    return [f"class{k}" for k in range(1, max(largest, 1) + 1)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for folder in (args.images, args.masks):
        if not folder.is_dir():
            print(f"error: {folder} is not a folder", file=sys.stderr)
            return 2
    if args.crop_size % 16:
        print(f"error: --crop-size {args.crop_size} is not a multiple of 16", file=sys.stderr)
        return 2
    try:
        check_model(args.model)
        parse_label_map(args.label_map)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs, problems = pair_files(args.images, args.masks)
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    labels = labels_for(args, [mask for _, mask in pairs])
    samples = []
    for image_path, mask_path in tqdm(pairs, desc="loading", unit="image"):
        try:
            samples.append(load_pair(image_path, mask_path, len(labels)))
        except (OSError, ValueError) as error:
            print(f"skipped: {error}", file=sys.stderr)
    if not samples:
        print(f"error: no usable image/mask pairs in {args.images} and {args.masks}", file=sys.stderr)
        return 2

    config = TrainConfig(
        minutes=args.minutes,
        device=args.device,
        val_fraction=args.val_fraction,
        seed=args.seed,
        crop_size=args.crop_size,
        batch_size=args.batch_size,
        max_epochs=args.epochs,
        model=args.model,
        init=args.init,
        label_map=args.label_map,
        allow_hub=args.allow_hub,
    )
    budget = round(config.minutes * 60)
    with tqdm(total=budget, desc="training", unit="s") as bar:

        def progress(update: Progress) -> None:
            bar.update(max(0, min(budget, round(update.elapsed_s)) - bar.n))
            postfix = {"epoch": update.epoch, "loss": f"{update.loss:.3f}"}
            if update.best_val_score is not None:
                postfix["val_dice"] = f"{update.best_val_score:.3f}"
            bar.set_postfix(postfix, refresh=False)

        try:
            info = train(samples, labels, args.out, config, progress=progress)
        except (OSError, ValueError) as error:  # an --init that cannot be loaded, among others
            print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
            return 2
    summary = {key: info.metrics[key] for key in ("val_dice", "val_iou", "validated_on", "epochs", "steps")}
    print(json.dumps({"version": info.version, "path": str(info.path), "labels": list(info.labels)} | summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
