"""Training data for the segmentation backend: crops, padding, normalisation, augmentation, pairing."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from segmentation.augment import build_augmentation
from segmentation.data import (
    CropDataset,
    Sample,
    load_pair,
    normalize,
    pad_to_at_least,
    pair_files,
    random_crop,
    split_samples,
)


def striped_sample(name: str, height: int, width: int) -> Sample:
    """Image whose red channel encodes the class of each pixel, so image/mask alignment is checkable."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 3 : 2 * width // 3] = 1
    mask[height // 2 :, 2 * width // 3 :] = 2
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = mask * 100
    return Sample(name, image, mask)


def test_sample_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="does not match"):
        Sample("x", np.zeros((4, 5, 3), np.uint8), np.zeros((5, 4), np.uint8))


def test_normalize_is_channels_first_and_standardised():
    image = np.random.default_rng(0).integers(0, 255, (7, 9, 3)).astype(np.uint8)
    out = normalize(image)
    assert out.shape == (3, 7, 9) and out.dtype == np.float32
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-3
    flat = normalize(np.full((4, 4, 3), 17, np.uint8))  # constant image: no division by zero
    assert np.isfinite(flat).all()


@pytest.mark.parametrize("size", [(5, 5), (30, 3), (64, 64)])
def test_pad_keeps_alignment_and_reaches_size(size):
    sample = striped_sample("s", *size)
    image, mask = pad_to_at_least(sample.image, sample.mask, 48)
    assert mask.shape[0] >= 48 and mask.shape[1] >= 48 and image.shape[:2] == mask.shape
    assert (image[..., 0] == mask * 100).all()
    assert (mask[: size[0], : size[1]] == sample.mask).all()


def test_random_crop_shapes_and_alignment():
    sample = striped_sample("s", 70, 50)
    rng = random.Random(1)
    for _ in range(20):
        image, mask = random_crop(sample.image, sample.mask, 32, rng)
        assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
        assert (image[..., 0] == mask * 100).all()


def test_augmentation_moves_image_and_mask_together():
    sample = striped_sample("s", 64, 64)
    augment = build_augmentation()
    for seed in range(10):
        random.seed(seed)
        np.random.seed(seed)
        out = augment(image=sample.image, mask=sample.mask)
        image, mask = out["image"], out["mask"]
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1, 2}  # nearest-neighbour: no invented class values
        # Far from class borders the (brightness-changed) red channel still orders the classes.
        for k in (1, 2):
            if (mask == k).sum() > 50 and (mask == 0).sum() > 50:
                assert np.median(image[..., 0][mask == k]) > np.median(image[..., 0][mask == 0])


def test_crop_dataset_items():
    dataset = CropDataset(
        [striped_sample("a", 40, 90), striped_sample("b", 100, 20)],
        crop_size=32,
        length=6,
        augment=build_augmentation(),
        seed=3,
    )
    assert len(dataset) == 6
    image, mask = dataset[0]
    assert tuple(image.shape) == (3, 32, 32) and str(image.dtype) == "torch.float32"
    assert tuple(mask.shape) == (1, 32, 32) and str(mask.dtype) == "torch.int64"


def test_split_keeps_training_data():
    samples = [striped_sample(str(i), 8, 8) for i in range(10)]
    train, val = split_samples(samples, 0.2, seed=0)
    assert len(train) == 8 and len(val) == 2
    assert {s.name for s in train}.isdisjoint({s.name for s in val})
    assert split_samples(samples[:1], 0.5) == (samples[:1], [])
    train, val = split_samples(samples[:2], 0.9)
    assert len(train) == 1 and len(val) == 1


def test_pairing_reports_missing_and_bad_pairs(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for stem in ("a", "b", "c"):
        Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(images / f"{stem}.png")
    Image.fromarray(np.ones((10, 12), np.uint8)).save(masks / "a.png")
    Image.fromarray(np.ones((11, 12), np.uint8)).save(masks / "b.png")  # wrong size
    Image.fromarray(np.ones((10, 12), np.uint8)).save(masks / "orphan.png")
    pairs, problems = pair_files(images, masks)
    assert [p[0].stem for p in pairs] == ["a", "b"]
    assert any("c.png has no mask" in p for p in problems)
    assert any("orphan.png has no image" in p for p in problems)
    assert load_pair(*pairs[0], n_labels=1).mask.max() == 1
    with pytest.raises(ValueError, match="12x11 but image b.png is 12x10"):
        load_pair(*pairs[1], n_labels=1)
    with pytest.raises(ValueError, match="only 0 labels"):
        load_pair(*pairs[0], n_labels=0)


def test_samples_from_label_studio_tasks_use_the_newest_usable_annotation():
    from backends.errors import ImageUnavailable
    from backends.label_studio.annotations import newest_annotation
    from backends.masks.rle import encode_rle
    from segmentation.data import samples_from_tasks

    truth = np.zeros((6, 8), bool)
    truth[1:4, 2:6] = True

    def brush(mask, label="Cell", from_name="tag"):
        return {
            "type": "brushlabels",
            "from_name": from_name,
            "to_name": "image",
            "original_width": 8,
            "original_height": 6,
            "value": {"format": "rle", "rle": encode_rle(mask), "brushlabels": [label]},
        }

    def annotation(i, result, when, cancelled=False):
        return {"id": i, "result": result, "updated_at": when, "was_cancelled": cancelled}

    polygon = {
        "type": "polygonlabels",
        "from_name": "poly",
        "to_name": "image",
        "original_width": 8,
        "original_height": 6,
        "value": {"points": [[0, 0], [25, 0], [25, 50], [0, 50]], "polygonlabels": ["Bud"]},
    }
    tasks = [
        {
            "id": 1,
            "data": {"image": "a.png"},
            "annotations": [
                annotation(1, [brush(~truth)], "2026-01-01"),
                annotation(2, [brush(truth), polygon], "2026-01-02"),  # newest usable: truth, polygon on top
                annotation(3, [brush(~truth)], "2026-01-03", cancelled=True),
            ],
        },
        {"id": 2, "data": {"image": "b.png"}, "annotations": []},  # unlabelled: silently not used
        {"id": 3, "data": {"image": "gone.png"}, "annotations": [annotation(4, [brush(truth)], "2026-01-01")]},
        {"id": 4, "data": {"image": "a.png"}, "annotations": [annotation(5, [brush(truth, "Dog")], "2026-01-01")]},
        {
            "id": 5,
            "data": {"image": "a.png"},
            "annotations": [annotation(6, [brush(truth, from_name="other")], "2026-01-01")],
        },
        {"id": 6, "data": {"image": "a.png"}, "annotations": [annotation(7, [], "2026-01-01")]},  # all background
    ]
    assert newest_annotation(tasks[0]["annotations"])["id"] == 2

    def load(uri, task_id):
        if uri == "gone.png":
            raise ImageUnavailable("image gone.png was not found (HTTP 404)")
        return np.zeros((6, 8, 3), np.uint8)

    samples, problems = samples_from_tasks(tasks, "image", ["tag", "poly"], {"Cell": 1, "Bud": 2}, load)
    assert [s.name for s in samples] == ["task-1", "task-6"]
    assert not samples[1].mask.any()
    expected = truth.astype(np.uint8)
    expected[0:3, 0:2] = 2  # polygon x 0..25 % of 8 = 0..2, y 0..50 % of 6 = 0..3, later wins
    assert samples[0].mask.tolist() == expected.tolist()
    text = "\n".join(problems)
    assert "task 3: image gone.png was not found" in text
    assert "task 4" in text and "'Dog'" in text
    assert "task 5: annotation 6 has no usable region" in text  # regions of other tags are ignored
    assert "task 2" not in text


def test_read_image_turns_the_image_as_its_exif_orientation_says(tmp_path):
    from segmentation.data import read_image

    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:10, :15] = (255, 0, 0)  # top-left red, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise, as Label Studio (the browser) shows it
    Image.fromarray(stored).save(tmp_path / "turned.jpg", quality=95, exif=exif)
    shown = read_image(tmp_path / "turned.jpg")
    assert shown.shape == (30, 20, 3)
    assert shown[2, -3, 0] > 200 and shown[-3, 2, 0] < 50  # red is now top-right
    (tmp_path / "junk.png").write_bytes(b"<html>not an image</html>")
    with pytest.raises(ValueError, match="HTML"):
        read_image(tmp_path / "junk.png")
