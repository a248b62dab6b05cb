"""Offline prediction with a trained model.

    python -m segmentation.predict --model MODEL_DIR --images DIR --out DIR

MODEL_DIR is a folder of versions (its current version is used) or one version folder.
Writes one class-index PNG per image (uint8, 0 = background, k = k-th label), same stem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from backends.devices import resolve_device
from segmentation.data import image_files, read_image
from segmentation.tiled_inference import segment_images
from segmentation.versions import METRICS_FILE, LoadedModel, load_current, load_version


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m segmentation.predict",
        description="Predict class-index PNG masks for a folder of images with a trained model.",
    )
    parser.add_argument(
        "--model", type=Path, required=True, help="MODEL_DIR (uses its current version) or a version folder"
    )
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument("--out", type=Path, required=True, help="output folder for <stem>.png masks")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (same-size images)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    return parser.parse_args(argv)


def load_model(path: Path, device: str) -> LoadedModel | None:
    """A version folder itself, or the current version of a MODEL_DIR."""
    if (path / METRICS_FILE).is_file():
        return load_version(path, resolve_device(device))
    return load_current(path, resolve_device(device))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, args.device) if args.model.is_dir() else None
    if model is None:
        print(f"error: no trained model in {args.model}", file=sys.stderr)
        return 2
    if not args.images.is_dir():
        print(f"error: {args.images} is not a folder", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    files = list(image_files(args.images).items())
    failures = 0
    with tqdm(total=len(files), desc=f"predicting ({model.info.version})", unit="image") as bar:
        for start in range(0, len(files), args.batch_size):
            batch = []
            for stem, path in files[start : start + args.batch_size]:
                try:
                    batch.append((stem, read_image(path)))
                except (OSError, ValueError) as error:  # unreadable file, or not a readable image
                    failures += 1
                    print(f"skipped: {path.name}: {error}", file=sys.stderr)
            results = segment_images(
                model.network,
                [image for _, image in batch],
                model.device,
                batch_size=args.batch_size,
                size_multiple=model.info.network.size_multiple,
            )
            for (stem, _), result in zip(batch, results, strict=True):
                Image.fromarray(result.mask.astype(np.uint8)).save(args.out / f"{stem}.png")
            bar.update(len(files[start : start + args.batch_size]))
    print(f"wrote {len(files) - failures} masks to {args.out} (labels: {', '.join(model.info.labels)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
