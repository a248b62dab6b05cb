"""What a new image can be: inversion of grey crops, stain and exposure jitter (segmentation/augment.py),
and how bench.seg_quality tells image kinds apart and splits DSB2018 (bench/seg_protocol.py)."""

from __future__ import annotations

import numpy as np

from bench.seg_protocol import GENERAL_REPORT, GENERAL_TRAIN, general_sets, image_kind
from segmentation.augment import InvertGrey, build_augmentation, is_grey


def grey_nuclei(height: int = 64, width: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A fluorescence-like crop: dark background (10), bright square nucleus (200)."""
    mask = np.zeros((height, width), np.uint8)
    mask[16:48, 16:48] = 1
    return np.repeat((10 + 190 * mask)[..., None], 3, axis=2).astype(np.uint8), mask


def test_grey_crops_are_inverted_and_colour_crops_left_alone():
    image, _ = grey_nuclei()
    inverted = InvertGrey(p=1.0)(image=image)["image"]
    assert (inverted == 255 - image).all()
    stained = image.copy()
    stained[..., 1] //= 2  # a colour (stained) crop: inversion would make no real image
    assert (InvertGrey(p=1.0)(image=stained)["image"] == stained).all()
    assert is_grey(image) and not is_grey(stained)


def test_augmentation_sometimes_shows_nuclei_dark_on_bright():
    image, mask = grey_nuclei()
    augment = build_augmentation(seed=0)
    dark_nuclei = 0
    for _ in range(60):
        out = augment(image=image, mask=mask)
        inside, outside = out["mask"] == 1, out["mask"] == 0
        assert inside.any() and outside.any()
        if out["image"][inside].mean() < out["image"][outside].mean():
            dark_nuclei += 1
    assert 5 <= dark_nuclei <= 35  # inversion with p=0.3: bright-field-like crops, but not most


def test_image_kinds_from_pixels():
    fluorescence, _ = grey_nuclei()
    brightfield = 255 - fluorescence
    he = np.zeros_like(fluorescence)
    he[...] = (200, 120, 190)  # pink/purple stained tissue
    assert image_kind(fluorescence) == "fluorescence"
    assert image_kind(brightfield) == "brightfield"
    assert image_kind(he) == "he"


def test_generalisation_sets_are_disjoint_and_hold_every_rare_kind():
    kinds = {f"f{i}": "fluorescence" for i in range(300)} | {f"h{i}": "he" for i in range(60)}
    kinds |= {f"b{i}": "brightfield" for i in range(8)}
    ids = sorted(kinds)
    tune, report = ids[0::2], ids[1::2]
    train, test = general_sets(kinds, tune, report)
    assert len(train) == GENERAL_TRAIN and len(test) == GENERAL_REPORT
    assert set(train) <= set(tune) and set(test) <= set(report)
    rare = {i for i in report if kinds[i] != "fluorescence"}
    assert rare <= set(test)
    assert general_sets(kinds, tune, report) == (train, test)  # fixed
