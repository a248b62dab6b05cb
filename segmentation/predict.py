"""Offline prediction with a trained model, or zero-shot with a pretrained one.

    python -m segmentation.predict --model MODEL_DIR --images DIR --out DIR
    python -m segmentation.predict --model hf:<id or folder> --label-map "Upper-clothes=Top" --images DIR --out DIR

--model is a folder of versions (its current version is used), one version folder, or a
pretrained transformers model (hf:<Hub id>, or a save_pretrained folder) whose classes become
labels through --label-map. Masks are cleaned as the backend cleans them (--min-confidence,
--min-component-px, --fill-holes-px). Writes one class-index PNG per image (uint8, 0 =
background, k = k-th label), same stem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from backends.devices import resolve_device
from segmentation.data import image_files, read_image
from segmentation.postprocess import Cleaning, clean_mask
from segmentation.tiled_inference import segment_images
from segmentation.versions import LOAD_ERRORS, METRICS_FILE, LoadedModel, load_current, load_version
from segmentation.zero_shot import load_zero_shot, zero_shot_source


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m segmentation.predict",
        description="Predict class-index PNG masks for a folder of images with a trained model.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="MODEL_DIR (uses its current version), a version folder, or hf:<Hub id or save_pretrained folder>",
    )
    parser.add_argument(
        "--label-map", default="", help='pretrained classes -> labels, "Upper-clothes=Top,Pants=Trousers"'
    )
    parser.add_argument("--allow-hub", action="store_true", help="a pretrained model may be downloaded from the Hub")
    parser.add_argument("--min-confidence", type=float, default=0.5, help="pixels below it are background (0.5)")
    parser.add_argument("--min-component-px", type=int, default=16, help="smaller components are dropped (16)")
    parser.add_argument("--fill-holes-px", type=int, default=64, help="smaller holes are filled (64)")
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument("--out", type=Path, required=True, help="output folder for <stem>.png masks")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (same-size images)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    return parser.parse_args(argv)


def load_model(model: str, device: str, label_map: str = "", allow_hub: bool = False) -> LoadedModel | None:
    """A version folder itself, the current version of a MODEL_DIR, or a pretrained model."""
    source = zero_shot_source(model, "unet", model_dir_has_versions=False)
    if source:
        return load_zero_shot(source, label_map, allow_hub, resolve_device(device))
    path = Path(model)
    if not path.is_dir():
        return None
    if (path / METRICS_FILE).is_file():
        return load_version(path, resolve_device(device))
    return load_current(path, resolve_device(device))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = load_model(args.model, args.device, args.label_map, args.allow_hub)
    except LOAD_ERRORS as error:
        print(f"error: cannot load {args.model}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    if model is None:
        print(f"error: no trained model in {args.model}", file=sys.stderr)
        return 2
    if not args.images.is_dir():
        print(f"error: {args.images} is not a folder", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    cleaning = Cleaning(args.min_confidence, args.min_component_px, args.fill_holes_px)
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
                normalization=model.info.network.normalization,
            )
            for (stem, _), result in zip(batch, results, strict=True):
                mask = clean_mask(result.mask, result.confidence, cleaning)
                Image.fromarray(mask).save(args.out / f"{stem}.png")
            bar.update(len(files[start : start + args.batch_size]))
    print(f"wrote {len(files) - failures} masks to {args.out} (labels: {', '.join(model.info.labels)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
