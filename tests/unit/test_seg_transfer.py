"""Transfer learning from the command line (--model, --init, --label-map) and where a backend run
starts (trainer.training_config): the project's last version of SEG_MODEL's family, else
SEG_CHECKPOINT, else SEG_MODEL."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from backends.settings import Settings
from segmentation.network import NetworkConfig, build_network
from segmentation.predict import main as predict_main
from segmentation.train import main as train_main
from segmentation.trainer import TrainConfig, training_config
from segmentation.versions import list_versions, save_version
from tests.support.tiny_hf_models import save_tiny_segformer
from tests.unit.test_seg_cli import write_dataset

QUICK = ("--minutes", "1", "--epochs", "1", "--threads", "1", "--crop-size", "64", "--batch-size", "2")


def test_pretrain_then_fine_tune_with_init_then_predict_zero_shot(tmp_path, one_thread, capsys):
    """In process (each CLI start costs seconds of imports); tests/unit/test_seg_cli.py runs them
    as commands."""
    images, masks = write_dataset(tmp_path / "data", 4, seed=0)
    segformer = save_tiny_segformer(tmp_path / "clothes", favour=2)
    pretrained_dir, tuned_dir = tmp_path / "pretrained", tmp_path / "tuned"
    common = ("--images", str(images), "--masks", str(masks), "--device", "cpu", *QUICK)

    assert (
        train_main([*common, "--out", str(pretrained_dir), "--model", f"hf:{segformer}", "--labels", "square,bar"]) == 0
    )
    (version,) = list_versions(pretrained_dir)
    assert version.network.family == "hf" and version.labels == ("square", "bar")

    assert train_main([*common, "--out", str(tuned_dir), "--init", str(version.path), "--labels", "bar,square"]) == 0
    (tuned,) = list_versions(tuned_dir)
    assert tuned.metrics["init"] == str(version.path) and tuned.network.family == "hf"

    out = tmp_path / "zero-shot"
    zero_shot = ["--model", f"hf:{segformer}", "--label-map", "Pants=bar", "--images", str(images), "--out", str(out)]
    assert predict_main([*zero_shot, "--device", "cpu"]) == 0
    mask = np.asarray(Image.open(out / "img0.png"))
    assert mask.shape == (64, 80) and set(np.unique(mask)) == {1}  # "Pants" (favoured) -> bar, class 1

    capsys.readouterr()
    assert train_main([*common, "--out", str(tmp_path / "x"), "--init", str(tmp_path / "nothing")]) == 2
    assert "error: OSError" in capsys.readouterr().err


@pytest.fixture
def settings(tmp_path):
    return dataclasses.replace(Settings(), train_minutes=3, val_fraction=0.1, seg_label_map="Pants=bar")


def test_a_backend_run_fine_tunes_the_projects_last_version_of_the_same_family(settings, tmp_path):
    project = tmp_path / "project-1"
    assert training_config(settings, "cpu", project) == TrainConfig(
        minutes=3, device="cpu", val_fraction=0.1, label_map="Pants=bar"
    )
    config = NetworkConfig(n_classes=2, channels=(4, 8), num_res_units=0)
    info = save_version(project, build_network(config).state_dict(), ("Nucleus",), config)
    assert training_config(settings, "cpu", project).init == str(info.path)
    # An older U-Net (transposed up-sampling): start over rather than keep its checkerboard.
    metrics = json.loads((info.path / "metrics.json").read_text())
    del metrics["network"]["upsample"]
    (info.path / "metrics.json").write_text(json.dumps(metrics))
    assert training_config(settings, "cpu", project).init is None
    # Another family configured: its pretrained model, or SEG_CHECKPOINT when that is set.
    hf = dataclasses.replace(settings, seg_model="hf:org/segformer")
    assert training_config(hf, "cpu", project).model == "hf:org/segformer"
    assert training_config(hf, "cpu", project).init is None
    folder = save_tiny_segformer(tmp_path / "clothes")
    assert training_config(dataclasses.replace(hf, seg_checkpoint=str(folder)), "cpu", project).init == f"hf:{folder}"


def test_validation_is_skipped_past_its_share_of_the_time_but_the_last_epoch_is_validated(one_thread):
    from segmentation.trainer import fit
    from tests.unit.test_seg_training import disks_sample

    rng = np.random.default_rng(0)
    samples = [disks_sample(f"s{i}", rng) for i in range(4)]
    seen = []
    config = TrainConfig(
        minutes=2, max_epochs=4, steps_per_epoch=2, batch_size=2, crop_size=64, device="cpu", max_validation_share=0
    )
    trained = fit(samples, ["red", "green"], config, progress=seen.append)
    assert [p.epoch for p in seen if p.validated] == [1, 4]
    assert trained.metrics["epochs"] == 4 and trained.metrics["validation_seconds"] > 0
