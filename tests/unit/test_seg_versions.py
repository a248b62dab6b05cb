"""Model versions: atomic promotion, so a kill mid-write leaves the served model intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from segmentation.network import NetworkConfig, build_network
from segmentation.versions import (
    CURRENT_FILE,
    INCOMPLETE_PREFIX,
    current_version,
    list_versions,
    load_current,
    load_version,
    remove_incomplete,
    save_version,
    set_current,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = NetworkConfig(n_classes=3, channels=(4, 8, 16))


def save_small(model_dir: Path, seed: int, **kwargs):
    torch.manual_seed(seed)
    network = build_network(SMALL)
    return save_version(
        model_dir,
        network.state_dict(),
        labels=("cell", "bud"),
        network=SMALL,
        metrics={"val_dice": {"cell": 0.5, "bud": None}},
        training={"minutes": 1},
        **kwargs,
    )


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_save_list_load_roundtrip(tmp_path):
    assert load_current(tmp_path / "absent") is None and list_versions(tmp_path / "absent") == []
    first = save_small(tmp_path, 1)
    second = save_small(tmp_path, 2)
    assert [v.version for v in list_versions(tmp_path)] == [first.version, second.version]
    assert current_version(tmp_path) == second.version
    loaded = load_current(tmp_path)
    assert loaded.info.labels == ("cell", "bud") and loaded.info.label_map == {"cell": 1, "bud": 2}
    assert loaded.info.metrics["val_dice"] == {"cell": 0.5, "bud": None}
    assert not loaded.network.training  # eval mode
    set_current(tmp_path, first.version)
    assert same_weights(load_current(tmp_path).network, load_version(first.path).network)
    assert not same_weights(load_current(tmp_path).network, loaded.network)
    with pytest.raises(FileNotFoundError):
        set_current(tmp_path, "seg-nonexistent")


def test_dangling_pointer_falls_back_to_newest(tmp_path):
    first = save_small(tmp_path, 1)
    (tmp_path / CURRENT_FILE).write_text("seg-deleted-by-hand")
    assert current_version(tmp_path) == first.version


# The child saves a large version through the real save_version, but its disk is "slow": the
# chosen step writes part of its data, says so, then blocks until it is killed with SIGKILL.
CHILD = textwrap.dedent(
    """
    import sys, time, torch
    import segmentation.versions as versions
    from segmentation.network import NetworkConfig

    stage = sys.argv[2]
    real_save, real_set_current = torch.save, versions.set_current

    def stalled_save(obj, handle):
        handle.write(b"partial" * 1000)
        handle.flush()
        print("writing", flush=True)
        time.sleep(600)

    def stalled_set_current(model_dir, version):
        print("writing", flush=True)
        time.sleep(600)

    if stage == "weights":
        versions.torch.save = stalled_save
    else:
        versions.set_current = stalled_set_current
    config = NetworkConfig(n_classes=3, channels=(4, 8, 16))
    big = {"weight": torch.zeros(4_000_000)}
    versions.save_version(sys.argv[1], big, labels=("cell", "bud"), network=config)
    """
)


@pytest.mark.parametrize("stage", ["weights", "pointer"])
def test_kill_mid_write_keeps_previous_version(tmp_path, stage):
    previous = save_small(tmp_path, 1)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), stage], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    if stage == "weights":  # the half-written version is invisible
        assert any(p.name.startswith(INCOMPLETE_PREFIX) for p in tmp_path.iterdir())
        assert [v.version for v in list_versions(tmp_path)] == [previous.version]
    else:  # complete but never promoted: listed, not served
        assert len(list_versions(tmp_path)) == 2
    assert (tmp_path / CURRENT_FILE).read_text() == previous.version
    served = load_current(tmp_path)
    assert served.info.version == previous.version
    assert same_weights(served.network, load_version(previous.path).network)

    remove_incomplete(tmp_path)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert load_current(tmp_path).info.version == previous.version
