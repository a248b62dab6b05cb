"""A serving segmentation backend picks up a version another process promoted (an RQ worker, the
offline CLI) without a restart, looking at `current` at most every SEG_VERSION_POLL_S."""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from backends.server.app import BackendServer
from backends.settings import Settings
from segmentation.model import SegmentationBackend
from segmentation.network import NetworkConfig, build_network
from segmentation.versions import WEIGHTS_FILE, remove_incomplete, save_version
from tests.support.payloads import BRUSH_CONFIG

SMALL = NetworkConfig(n_classes=2, channels=(4, 8, 16))


def save_small(folder, seed: int):
    torch.manual_seed(seed)
    return save_version(folder, build_network(SMALL).state_dict(), labels=("Nucleus",), network=SMALL)


def project_model(tmp_path, poll_s: float) -> SegmentationBackend:
    settings = dataclasses.replace(
        Settings(), model_dir=tmp_path / "models", device="cpu", seg_version_poll_s=poll_s, image_cache_dir=tmp_path
    )
    server = BackendServer(SegmentationBackend, settings)
    return server.instances.get("1", BRUSH_CONFIG)


def test_a_version_promoted_by_another_process_is_served_after_the_poll_interval(tmp_path):
    model = project_model(tmp_path, poll_s=0.3)
    assert model.served_model() is None
    first = save_small(model.project_dir, 1)  # "another process": nothing tells the backend
    time.sleep(0.35)
    assert model.served_model().info.version == first.version
    second = save_small(model.project_dir, 2)
    assert model.served_model().info.version == first.version  # not looked at again yet
    time.sleep(0.35)
    assert model.served_model().info.version == second.version
    assert model.model_version == second.version


def test_a_version_that_cannot_be_loaded_leaves_the_served_one_and_is_tried_once(tmp_path, caplog):
    model = project_model(tmp_path, poll_s=0.0)
    good = save_small(model.project_dir, 1)
    assert model.served_model().info.version == good.version
    broken = save_small(model.project_dir, 2)
    (broken.path / WEIGHTS_FILE).write_bytes(b"not a torch file")
    for _ in range(3):
        assert model.served_model().info.version == good.version
    assert sum("cannot load version" in record.message for record in caplog.records) == 1


def test_only_old_leftovers_are_removed_where_writers_share_model_dir(tmp_path):
    folder = tmp_path / "project-1"
    folder.mkdir()
    young, old = folder / ".incomplete-young", folder / ".incomplete-old"
    young.mkdir()
    old.mkdir()
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert remove_incomplete(folder, older_than_s=600) == [old]
    assert young.exists() and not old.exists()
    assert remove_incomplete(folder) == [young]  # alone: every leftover goes
