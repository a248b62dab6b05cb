"""Offline CLIs: train on a folder of image/mask pairs, predict masks for another folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from segmentation.versions import list_versions

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_dataset(root: Path, n: int, seed: int, sizes=((64, 80), (72, 56))) -> tuple[Path, Path]:
    """n images with bright squares (class 1) and bright bars (class 2), masks as class-index PNGs."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(n):
        height, width = sizes[i % len(sizes)]
        image = rng.integers(0, 50, (height, width, 3)).astype(np.uint8)
        mask = np.zeros((height, width), np.uint8)
        for k in (1, 2):
            top, left = rng.integers(0, height - 20), rng.integers(0, width - 20)
            shape = (
                (slice(top, top + 14), slice(left, left + 14))
                if k == 1
                else (slice(top, top + 20), slice(left, left + 5))
            )
            mask[shape] = k
            image[shape] = 230 if k == 1 else 140
        Image.fromarray(image).save(images / f"img{i}.png")
        Image.fromarray(mask).save(masks / f"img{i}.png")
    return images, masks


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240
    )


def test_help():
    for module in ("segmentation.train", "segmentation.predict"):
        result = run(module, "--help")
        assert result.returncode == 0 and "--images" in result.stdout and "--out" in result.stdout


def test_train_then_predict_round_trip(tmp_path):
    images, masks = write_dataset(tmp_path / "train", 6, seed=0)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(images / "unlabelled.png")  # no mask
    model_dir = tmp_path / "models"
    trained = run(
        "segmentation.train",
        "--images",
        str(images),
        "--masks",
        str(masks),
        "--out",
        str(model_dir),
        "--minutes",
        "1",
        "--epochs",
        "6",
        "--threads",
        "1",
        "--labels",
        "square,bar",
        "--crop-size",
        "64",
        "--batch-size",
        "4",
        "--device",
        "cpu",
    )
    assert trained.returncode == 0, trained.stderr
    assert "unlabelled.png has no mask" in trained.stderr
    assert "training" in trained.stderr  # the tqdm bar
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["labels"] == ["square", "bar"] and set(summary["val_dice"]) == {"square", "bar"}
    assert [v.version for v in list_versions(model_dir)] == [summary["version"]]

    test_images, test_masks = write_dataset(tmp_path / "test", 3, seed=9, sizes=((61, 77), (90, 45)))
    out = tmp_path / "predicted"
    predicted = run(
        "segmentation.predict",
        "--model",
        str(model_dir),
        "--images",
        str(test_images),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--threads",
        "1",
    )
    assert predicted.returncode == 0, predicted.stderr
    for truth_path in sorted(test_masks.iterdir()):
        truth = np.array(Image.open(truth_path))
        mask = np.array(Image.open(out / truth_path.name))
        assert mask.shape == truth.shape and mask.dtype == np.uint8  # exact size, class indices
        assert set(np.unique(mask)) <= {0, 1, 2}
        assert (mask == truth).mean() > 0.9  # better than all-background (~0.9 or less)


def test_train_reports_unusable_input(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(images / "a.png")
    Image.fromarray(np.full((10, 10), 5, np.uint8)).save(masks / "a.png")
    result = run(
        "segmentation.train",
        "--images",
        str(images),
        "--masks",
        str(masks),
        "--out",
        str(tmp_path / "m"),
        "--labels",
        "one",
    )
    assert result.returncode == 2
    assert "pixel value 5 but only 1 labels" in result.stderr and "no usable image/mask pairs" in result.stderr
