"""Training the U-Net: per-class scores, a few seconds of training beat an untrained network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segmentation.data import Sample
from segmentation.network import NetworkConfig, build_network
from segmentation.trainer import TrainConfig, class_scores, evaluate, train
from segmentation.versions import list_versions, load_current


def disks_sample(name: str, rng: np.random.Generator, height: int = 72, width: int = 88) -> Sample:
    """Noisy background with red disks (class 1) and green disks (class 2)."""
    image = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    rows, cols = np.ogrid[:height, :width]
    for _ in range(4):
        cy, cx, radius = rng.integers(10, height - 10), rng.integers(10, width - 10), rng.integers(5, 11)
        disk = (rows - cy) ** 2 + (cols - cx) ** 2 < radius**2
        k = int(rng.integers(1, 3))
        mask[disk] = k
        image[disk] = (210, 70, 70) if k == 1 else (70, 210, 70)
    return Sample(name, image, mask)


def test_class_scores_exact():
    truth = np.array([[0, 1, 1], [2, 2, 0]], np.uint8)
    predicted = np.array([[1, 1, 0], [2, 2, 2]], np.uint8)
    scores = class_scores([truth], [predicted], n_classes=4)
    # class 1: truth 2 px, predicted 2 px, overlap 1; class 2: truth 2, predicted 3, overlap 2
    assert scores["dice"][:2] == [0.5, 0.8]
    assert scores["iou"][:2] == [1 / 3, 2 / 3]
    assert scores["dice"][2] is None and scores["iou"][2] is None  # class 3 absent everywhere


def test_short_training_beats_untrained_and_saves_a_version(tmp_path, one_thread):
    rng = np.random.default_rng(0)
    samples = [disks_sample(f"s{i}", rng) for i in range(6)]
    held_out = [disks_sample(f"t{i}", rng) for i in range(3)]
    device = torch.device("cpu")
    # A fixed amount of work (80 steps, ~3 s) keeps the result independent of machine load;
    # the time budget is only a safety cap here.
    config = TrainConfig(minutes=2, max_epochs=8, device="cpu", crop_size=64, batch_size=4, steps_per_epoch=10, seed=1)
    seen = []
    torch.manual_seed(1)
    untrained = evaluate(build_network(NetworkConfig(n_classes=3)), held_out, 3, device)

    info = train(samples, ["red", "green"], tmp_path, config, progress=seen.append)

    assert [v.version for v in list_versions(tmp_path)] == [info.version]
    model = load_current(tmp_path)
    trained = evaluate(model.network, held_out, 3, device)
    assert trained["mean_dice"] > untrained["mean_dice"] + 0.2, (trained, untrained)
    assert trained["mean_dice"] > 0.6
    # Metrics stored with the version: per-label validation Dice/IoU on held-out samples.
    assert set(info.metrics["val_dice"]) == {"red", "green"}
    assert info.metrics["validated_on"] == "held_out" and info.metrics["n_val"] == 1
    assert info.label_map == {"red": 1, "green": 2}
    assert info.training["minutes"] == config.minutes
    assert sum(p.validated for p in seen) == 8 and seen[-1].step == 80 and info.metrics["epochs"] == 8


def test_training_respects_the_time_budget(one_thread):
    rng = np.random.default_rng(2)
    samples = [disks_sample(f"s{i}", rng) for i in range(2)]
    from segmentation.trainer import fit

    config = TrainConfig(minutes=1 / 60, device="cpu", crop_size=64, batch_size=2, steps_per_epoch=1000)
    trained = fit(samples, ["red", "green"], config)
    # The epoch is far longer than the budget: the loop must stop on time, not at the epoch's end.
    assert trained.metrics["train_seconds"] < 1 + 5
    assert trained.metrics["steps"] < 1000
    assert trained.state_dict and trained.network.n_classes == 3


@pytest.mark.parametrize("minutes", [0, -1.0])
def test_a_training_budget_that_is_not_positive_is_refused_clearly(minutes):
    from segmentation.trainer import fit

    samples = [disks_sample("s0", np.random.default_rng(0))]
    with pytest.raises(ValueError, match="TRAIN_MINUTES"):
        fit(samples, ["red", "green"], TrainConfig(minutes=minutes, device="cpu", crop_size=64))
