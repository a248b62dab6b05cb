"""Brush RLE speed against label-studio-sdk on 1024x1024 masks.

`python -m bench.rle` prints rle_encode_ms and rle_decode_ms: the median (over masks) of each
mask's median time, ours as value, label_studio_sdk.converter.brush as reference, same masks,
same run. Outputs are checked byte-identical / equal before timing.
"""

from __future__ import annotations

import statistics
from functools import partial
from pathlib import Path

import numpy as np
from label_studio_sdk.converter import brush
from PIL import Image
from scipy import ndimage

from backends.masks import rle
from bench.common import emit, machine, median_ms

SIZE = 1024
DSB2018 = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dsb2018"


def realistic_masks() -> tuple[list[np.ndarray], str]:
    """HxW bool masks: dsb2018 foregrounds and single nuclei resized to 1024x1024, random blobs."""
    masks, described = [], []
    labels = sorted((DSB2018 / "labels").glob("*.png"))[:4]
    for path in labels:
        instances = np.array(Image.open(path))
        masks.append(_resize(instances > 0))
    if labels:
        instances = np.array(Image.open(labels[0]))
        largest = np.argmax(np.bincount(instances.ravel())[1:]) + 1
        masks.append(_resize(instances == largest))
        described.append(
            f"dsb2018 labels {', '.join(p.stem[:8] for p in labels)} (foreground, nearest-resized "
            f"to {SIZE}x{SIZE}) and the largest nucleus of {labels[0].stem[:8]}"
        )
    rng = np.random.default_rng(0)
    for sigma, level in ((24, 0.6), (12, 0.55)):
        noise = ndimage.gaussian_filter(rng.random((SIZE, SIZE)), sigma)
        masks.append(noise > np.quantile(noise, level))
    described.append("2 random blob masks (smoothed noise, sigma 24 and 12)")
    return masks, "; ".join(described)


def _resize(mask: np.ndarray) -> np.ndarray:
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.array(image.resize((SIZE, SIZE), Image.Resampling.NEAREST)) > 0


def main() -> None:
    masks, data = realistic_masks()
    encode_ours, encode_sdk, decode_ours, decode_sdk = [], [], [], []
    for mask in masks:
        as_255 = mask.astype(np.uint8) * 255
        reference = brush.mask2rle(as_255)
        if rle.encode_rle(mask) != reference:
            raise SystemExit("encode_rle differs from label_studio_sdk mask2rle")
        if not np.array_equal(rle.decode_rle(reference, SIZE, SIZE), mask):
            raise SystemExit("decode_rle differs from the mask")
        encode_ours.append(median_ms(partial(rle.encode_rle, mask), repeats=15))
        encode_sdk.append(median_ms(partial(brush.mask2rle, as_255), repeats=5))
        decode_ours.append(median_ms(partial(rle.decode_rle, reference, SIZE, SIZE), repeats=15))
        decode_sdk.append(median_ms(partial(brush.decode_rle, reference), repeats=5))
    common = {"machine": machine(), "data": f"{len(masks)} masks {SIZE}x{SIZE}: {data}"}
    emit(
        "rle_encode_ms",
        statistics.median(encode_ours),
        "ms",
        statistics.median(encode_sdk),
        worst_ratio=round(max(o / s for o, s in zip(encode_ours, encode_sdk, strict=True)), 4),
        **common,
    )
    emit(
        "rle_decode_ms",
        statistics.median(decode_ours),
        "ms",
        statistics.median(decode_sdk),
        worst_ratio=round(max(o / s for o, s in zip(decode_ours, decode_sdk, strict=True)), 4),
        **common,
    )


if __name__ == "__main__":
    main()
