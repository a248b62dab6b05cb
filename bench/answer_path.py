"""The answer path of an interactive click: HxW bool mask -> brush region (RLE) -> JSON bytes.

    python -m bench.answer_path

Realistic masks, not random-weight noise: a smooth ellipse at 1024x1024 and at 4096x4096, and the
shared DSB2018 nucleus masks at their own size (skipped with a note where ../shared is absent).
For each, `answer_ms` (p50 over 30 runs after a warm-up) of `brush_region` + the server's JSON
rendering (orjson), against label-studio-sdk's `mask2rle` + `json.dumps`, the bare reference.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import orjson
from label_studio_sdk.converter import brush
from PIL import Image

from backends.label_studio.label_config import ControlTag
from backends.label_studio.regions import brush_region
from bench.common import emit, machine

DSB2018 = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dsb2018"
TAG = ControlTag(name="tag", type="BrushLabels", to_name="image", labels=("Nucleus",), smart=False)


def ellipse(size: int) -> np.ndarray:
    rows, cols = np.ogrid[:size, :size]
    centre, radius = size / 2, size / 5
    return ((cols - centre) / radius) ** 2 + ((rows - centre) / (0.7 * radius)) ** 2 <= 1


def dsb_nuclei(count: int = 20) -> list[np.ndarray]:
    """The largest nucleus of each of the first `count` DSB2018 label images, at the image's size."""
    masks = []
    for path in sorted((DSB2018 / "labels").glob("*.png"))[:count]:
        instances = np.asarray(Image.open(path))
        if instances.max() == 0:
            continue
        largest = int(np.argmax(np.bincount(instances.ravel())[1:]) + 1)
        masks.append(instances == largest)
    return masks


def p50_ms(function, repeats: int = 30) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def ours(mask: np.ndarray) -> bytes:
    return orjson.dumps({"results": [{"result": [brush_region(mask, "Nucleus", TAG, 0.9)]}]})


def bare(mask: np.ndarray) -> bytes:
    height, width = mask.shape
    region = {
        "type": "brushlabels",
        "value": {"format": "rle", "rle": brush.mask2rle(mask.astype(np.uint8) * 255), "brushlabels": ["Nucleus"]},
        "original_width": width,
        "original_height": height,
    }
    return json.dumps({"results": [{"result": [region]}]}).encode()


def main() -> None:
    cases = [("smooth ellipse 1024x1024", [ellipse(1024)]), ("smooth ellipse 4096x4096", [ellipse(4096)])]
    nuclei = dsb_nuclei()
    if nuclei:
        cases.append((f"largest nucleus of {len(nuclei)} DSB2018 label images, at their size", nuclei))
    else:
        print(json.dumps({"note": f"{DSB2018} not found: DSB2018 figure skipped"}))
    for name, masks in cases:
        value = statistics.median(p50_ms(lambda m=m: ours(m), 10 if m.size > 4e6 else 30) for m in masks)
        reference = statistics.median(p50_ms(lambda m=m: bare(m), 3 if m.size > 4e6 else 10) for m in masks)
        emit(
            "answer_ms",
            value,
            "ms",
            reference,
            masks=name,
            count=len(masks),
            baseline="label-studio-sdk mask2rle + json.dumps",
            machine=machine(),
        )


if __name__ == "__main__":
    main()
