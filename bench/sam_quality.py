"""Box-prompt quality of the `classic` engine on DSB2018 nuclei: `python -m bench.sam_quality`.

Each instance's tight bounding box is the prompt, its mask the truth. The images are split by
sorted id: the first half was used to choose and tune the method, this benchmark reports on the
second half (held out). References, measured in the same run on the same prompts: the filled box
itself, and GrabCut on a crop around the box that falls back to the box when GrabCut returns nothing.
At most `--per-image` instances per image (evenly spaced by label id, deterministic).

Figures: classic_box_iou (reference: filled box), classic_box_iou_vs_grabcut (reference: GrabCut
crop with fallback), classic_prompt_ms (p50 per prompt; reference: the GrabCut baseline's).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from bench.common import emit, machine
from sam.engines.classic import ClassicEngine

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dsb2018"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def grabcut_crop_with_fallback(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Baseline: GrabCut (5 iterations, rectangle init) on the box plus a 25 % margin; the box if empty."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = box
    mx, my = max(4, int((x1 - x0) * 0.25)), max(4, int((y1 - y0) * 0.25))
    cx0, cy0, cx1, cy1 = max(0, x0 - mx), max(0, y0 - my), min(width, x1 + mx), min(height, y1 + my)
    crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1, ::-1])
    labels = np.zeros(crop.shape[:2], np.uint8)
    try:
        cv2.grabCut(
            crop,
            labels,
            (x0 - cx0, y0 - cy0, x1 - x0, y1 - y0),
            np.zeros((1, 65)),
            np.zeros((1, 65)),
            5,
            cv2.GC_INIT_WITH_RECT,
        )
        found = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    except cv2.error:
        found = np.zeros(crop.shape[:2], bool)
    mask = np.zeros((height, width), bool)
    if found.any():
        mask[cy0:cy1, cx0:cx1] = found
    else:
        mask[y0:y1, x0:x1] = True
    return mask


def held_out_ids(data: Path) -> list[str]:
    ids = sorted(p.stem for p in (data / "images").glob("*.png"))
    return ids[len(ids) // 2 :]


def run(data: Path, per_image: int, limit_images: int | None) -> None:
    engine = ClassicEngine()
    ids = held_out_ids(data)[:limit_images]
    scores: dict[str, list[float]] = {"classic": [], "box": [], "grabcut": []}
    times: dict[str, list[float]] = {"classic": [], "grabcut": []}
    for image_id in ids:
        image = np.array(Image.open(data / "images" / f"{image_id}.png").convert("RGB"))
        labels = np.array(Image.open(data / "labels" / f"{image_id}.png"))
        embedding = engine.embed(image)
        objects = [(k + 1, found) for k, found in enumerate(ndi.find_objects(labels)) if found is not None]
        step = max(1, -(-len(objects) // per_image))
        for label, found in objects[::step]:
            truth = labels == label
            box = (found[1].start, found[0].start, found[1].stop, found[0].stop)
            filled = np.zeros_like(truth)
            filled[found] = True
            started = time.perf_counter()
            mask, _ = engine.predict(embedding, box=box)
            times["classic"].append(time.perf_counter() - started)
            started = time.perf_counter()
            baseline = grabcut_crop_with_fallback(image, box)
            times["grabcut"].append(time.perf_counter() - started)
            scores["classic"].append(iou(mask, truth))
            scores["box"].append(iou(filled, truth))
            scores["grabcut"].append(iou(baseline, truth))
    count = len(scores["classic"])
    described = (
        f"dsb2018 held-out half (sorted ids {len(ids)} images from {ids[0]}), {count} instances "
        f"(at most {per_image} per image), tight-box prompts"
    )
    common = {"machine": machine(), "data": described, "instances": count}
    mean = {name: float(np.mean(values)) for name, values in scores.items()}
    emit("classic_box_iou", round(mean["classic"], 4), "iou", round(mean["box"], 4), baseline="filled box", **common)
    emit(
        "classic_box_iou_vs_grabcut",
        round(mean["classic"], 4),
        "iou",
        round(mean["grabcut"], 4),
        baseline="GrabCut on a crop (25% margin, 5 iterations), box when empty",
        **common,
    )
    p50 = {name: 1000 * float(np.median(values)) for name, values in times.items()}
    emit(
        "classic_prompt_ms",
        round(p50["classic"], 2),
        "ms",
        round(p50["grabcut"], 2),
        baseline="GrabCut crop p50",
        **common,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the dsb2018 folder (images/, labels/)")
    parser.add_argument("--per-image", type=int, default=25, help="instances per image at most (default 25)")
    parser.add_argument("--limit-images", type=int, default=None, help="only the first N held-out images")
    args = parser.parse_args(argv)
    if not (args.data / "images").is_dir():
        raise SystemExit(f"dsb2018 not found at {args.data} (expected ../shared/data/dsb2018 beside the checkout)")
    run(args.data, args.per_image, args.limit_images)


if __name__ == "__main__":
    main()
