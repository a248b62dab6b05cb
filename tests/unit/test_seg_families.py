"""Model families: a tiny saved SegFormer (nothing downloaded) loads, pre-annotates zero-shot
through a label map, fine-tunes into a version that reloads and predicts; --init carries an
earlier model's weights (its head rows by label name); versions saved before families load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from segmentation.families import head_dims, initial_network, network_from_json, transfer_state
from segmentation.hf_network import HFNetworkConfig, HFSegmenter
from segmentation.network import NetworkConfig, ResizeConvUNet, build_network
from segmentation.tiled_inference import segment_images
from segmentation.trainer import TrainConfig, train
from segmentation.versions import METRICS_FILE, WEIGHTS_FILE, load_version
from segmentation.zero_shot import load_zero_shot, zero_shot_source
from tests.support.tiny_hf_models import save_tiny_segformer
from tests.unit.test_seg_training import disks_sample

FEW_STEPS = {"minutes": 2, "max_epochs": 2, "steps_per_epoch": 3, "batch_size": 2, "crop_size": 64, "device": "cpu"}


@pytest.fixture(scope="module")
def segformer_dir(tmp_path_factory):
    return save_tiny_segformer(tmp_path_factory.mktemp("segformer") / "clothes")


def test_zero_shot_merges_the_model_classes_into_mapped_labels(segformer_dir):
    model = load_zero_shot(str(segformer_dir), "Upper-clothes=Top,Pants=Trousers,Hair=Trousers", False, "cpu")
    assert model.info.labels == ("Top", "Trousers")
    assert model.info.version == "pretrained-clothes"
    assert model.info.network.normalization.mean == (0.5, 0.5, 0.5)  # from preprocessor_config.json
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        original = torch.softmax(model.network.network(pixels), dim=1)  # Background, Upper, Pants, Hair
        merged = torch.softmax(model.network(pixels), dim=1)
    assert merged.shape == (1, 3, 64, 64)
    torch.testing.assert_close(merged[:, 0], original[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(merged[:, 2], original[:, 2] + original[:, 3], atol=1e-4, rtol=0)
    (segmentation,) = segment_images(
        model.network, [np.zeros((40, 50, 3), np.uint8)], "cpu", size_multiple=32, normalization=model.info.network.norm
    )
    assert segmentation.mask.shape == (40, 50) and segmentation.mask.max() <= 2


def test_zero_shot_without_a_map_keeps_the_class_names_and_a_map_matching_nothing_is_refused(segformer_dir):
    assert load_zero_shot(str(segformer_dir), "", False, "cpu").info.labels == ("Upper-clothes", "Pants", "Hair")
    with pytest.raises(ValueError, match="SEG_LABEL_MAP"):
        load_zero_shot(str(segformer_dir), "Shoe=Shoe", False, "cpu")


def test_which_model_is_served_before_training():
    assert zero_shot_source("hf:org/model", "unet", False) == "org/model"
    assert zero_shot_source("", "hf:org/model", model_dir_has_versions=False) == "org/model"
    assert zero_shot_source("", "hf:org/model", model_dir_has_versions=True) is None  # a trained one wins
    assert zero_shot_source("", "unet", model_dir_has_versions=False) is None


def test_a_hub_id_is_never_downloaded_without_seg_allow_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(OSError):
        load_zero_shot("nobody/not-a-cached-model", "", False, "cpu")


def test_fine_tuning_a_pretrained_model_saves_a_version_that_reloads_and_predicts(segformer_dir, tmp_path, one_thread):
    rng = np.random.default_rng(0)
    samples = [disks_sample(f"s{i}", rng) for i in range(3)]
    config = TrainConfig(model=f"hf:{segformer_dir}", label_map="Upper-clothes=red", warmup_fraction=0.5, **FEW_STEPS)
    info = train(samples, ["red", "green"], tmp_path, config)

    saved = json.loads((info.path / METRICS_FILE).read_text())
    assert saved["network"]["family"] == "hf" and saved["network"]["source"] == str(segformer_dir)
    assert saved["network"]["hf_config"]["id2label"] == {"0": "background", "1": "red", "2": "green"}
    assert saved["metrics"]["init"] == str(segformer_dir)
    model = load_version(info.path)
    assert isinstance(model.info.network, HFNetworkConfig) and isinstance(model.network, HFSegmenter)
    assert model.info.network.normalization.std == (0.25, 0.25, 0.25)
    image = samples[0].image
    (segmentation,) = segment_images(
        model.network, [image], "cpu", size_multiple=32, normalization=model.info.network.normalization
    )
    assert segmentation.mask.shape == image.shape[:2]


def test_the_pretrained_head_row_of_a_mapped_class_carries_over(segformer_dir):
    start = initial_network(f"hf:{segformer_dir}", ["Top", "Shoe"], label_map={"upper-clothes": "Top"})
    pretrained = load_zero_shot(str(segformer_dir), "", False, "cpu").network.network.state_dict()
    fresh = start.network.state_dict()
    key = "model.decode_head.classifier.weight"
    assert start.head == {key, "model.decode_head.classifier.bias"}
    assert torch.equal(fresh[key][0], pretrained[key][0])  # background
    assert torch.equal(fresh[key][1], pretrained[key][1])  # Upper-clothes -> Top
    assert not torch.equal(fresh[key][2], pretrained[key][2])  # Shoe: a new row
    assert "model.segformer.stages.0.patch_embeddings.proj.weight" in start.pretrained_keys


def test_init_from_a_version_keeps_the_rows_of_shared_labels(tmp_path):
    config = NetworkConfig(n_classes=3, channels=(4, 8), num_res_units=0)
    earlier = build_network(config)
    old_state = {key: value.clone() for key, value in earlier.state_dict().items()}
    later = build_network(NetworkConfig(n_classes=3, channels=(4, 8), num_res_units=0))
    head = head_dims(config)
    assert head  # the last up-sampling layer's weights depend on the classes
    transferred = transfer_state(
        old_state, ["background", "red", "green"], later, ["background", "green", "blue"], head
    )
    new_state = later.state_dict()
    assert set(transferred) == set(old_state)
    assert head == {"model.2.1.conv.weight": (0,), "model.2.1.conv.bias": (0,)}
    for key in head:
        assert torch.equal(new_state[key][0], old_state[key][0])  # background
        assert torch.equal(new_state[key][1], old_state[key][2])  # "green" was class 2, is class 1
        assert not torch.equal(new_state[key][2], old_state[key][1])  # "blue" is new, "red" is gone
    body = "model.0.conv.weight"
    assert torch.equal(new_state[body], old_state[body])


def test_versions_saved_before_model_families_still_load(tmp_path):
    """metrics.json of an older version: no `family`, no `upsample`; transposed convolutions."""
    old_network = UNet(
        spatial_dims=2,
        in_channels=3,
        out_channels=2,
        channels=(4, 8),
        strides=(2,),
        num_res_units=0,
        norm="batch",
    )
    version = tmp_path / "seg-20261101-120000-ab12"
    version.mkdir()
    torch.save(old_network.state_dict(), version / WEIGHTS_FILE)
    network = {"n_classes": 2, "channels": [4, 8], "in_channels": 3, "num_res_units": 0, "dropout": 0.0}
    metrics = {"version": version.name, "labels": ["Nucleus"], "network": network, "created": "2026-11-01T12:00:00"}
    (version / METRICS_FILE).write_text(json.dumps(metrics))

    loaded = load_version(version)
    assert loaded.info.network == NetworkConfig(2, (4, 8), 3, 0, 0.0, upsample="transposed")
    assert type(loaded.network) is UNet and not isinstance(loaded.network, ResizeConvUNet)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(x), old_network.eval()(x))
    assert network_from_json(NetworkConfig(2).to_json()).upsample == "resize"
