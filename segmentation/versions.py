"""Trained model versions on disk, written atomically.

Layout of MODEL_DIR:

    MODEL_DIR/
      current                       text file: the served version's name
      seg-20261101-120000-ab12/     one complete version
        weights.pt                  torch state_dict (loaded with weights_only=True)
        metrics.json                label map, network (its family and what rebuilds it: the
                                    U-Net's config, or a transformers model's config.to_dict()
                                    and input normalisation), training settings, validation
                                    Dice/IoU per class, created time
      .incomplete-seg-.../          a version being written (ignored; removed at startup)

A version is written into `.incomplete-<name>/`, flushed to disk, then renamed into place
(os.replace of the directory), and only then is `current` replaced (write a temporary file,
os.replace). A crash or kill at any moment therefore leaves either the old or the new version
current, never a half-written one. Versions written before model families existed have a network
without `family` (a U-Net) and without `upsample` (the transposed convolution): they load as they were.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from segmentation.families import NetworkSpec, build, network_from_json

WEIGHTS_FILE = "weights.pt"
METRICS_FILE = "metrics.json"
CURRENT_FILE = "current"
INCOMPLETE_PREFIX = ".incomplete-"
#: What `load_version` raises for a version it cannot load: missing or unreadable files, a bad
#: metrics.json, weights that do not fit the network, or a pickle torch refuses (weights_only=True).
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError)


@dataclass(frozen=True)
class VersionInfo:
    """What is known about one saved model. `labels[k - 1]` is class k; class 0 is background."""

    version: str
    path: Path
    labels: tuple[str, ...]
    network: NetworkSpec  # NetworkConfig (unet) or HFNetworkConfig (hf:)
    created: str  # ISO 8601, UTC
    metrics: Mapping = field(default_factory=dict)  # e.g. {"val_dice": {label: v}, "val_iou": {...}}
    training: Mapping = field(default_factory=dict)  # settings the run used

    @property
    def label_map(self) -> dict[str, int]:
        """label -> class index (1-based)."""
        return {label: index for index, label in enumerate(self.labels, start=1)}

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "labels": list(self.labels),
            "label_map": {"0": "background"} | {str(k): label for label, k in self.label_map.items()},
            "network": self.network.to_json(),
            "created": self.created,
            "metrics": dict(self.metrics),
            "training": dict(self.training),
        }

    @classmethod
    def read(cls, path: Path) -> VersionInfo:
        """Read `path/metrics.json`; raises FileNotFoundError / ValueError for a broken version."""
        data = json.loads((Path(path) / METRICS_FILE).read_text())
        return cls(
            version=data["version"],
            path=Path(path),
            labels=tuple(data["labels"]),
            network=network_from_json(data["network"]),
            created=data["created"],
            metrics=data.get("metrics", {}),
            training=data.get("training", {}),
        )


@dataclass
class LoadedModel:
    """A version's network in eval mode on `device`, with its metadata."""

    info: VersionInfo
    network: torch.nn.Module
    device: torch.device


def new_version_name(now: datetime | None = None) -> str:
    """Sortable, unique: seg-YYYYmmdd-HHMMSS-xxxx (UTC)."""
    now = now or datetime.now(UTC)
    return f"seg-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> None:
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def save_version(
    model_dir: Path,
    state_dict: Mapping[str, torch.Tensor],
    labels: tuple[str, ...],
    network: NetworkSpec,
    metrics: Mapping | None = None,
    training: Mapping | None = None,
    make_current: bool = True,
    version: str | None = None,
) -> VersionInfo:
    """Write a complete version under model_dir, then (optionally) make it current."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    version = version or new_version_name()
    final = model_dir / version
    if final.exists():
        raise FileExistsError(f"version {version} already exists in {model_dir}")
    info = VersionInfo(
        version=version,
        path=final,
        labels=tuple(labels),
        network=network,
        created=datetime.now(UTC).isoformat(timespec="microseconds"),
        metrics=dict(metrics or {}),
        training=dict(training or {}),
    )
    staging = model_dir / f"{INCOMPLETE_PREFIX}{version}"
    staging.mkdir()
    cpu_state = {name: tensor.detach().cpu() for name, tensor in state_dict.items()}
    _write_file(staging / WEIGHTS_FILE, lambda handle: torch.save(cpu_state, handle))
    _write_file(staging / METRICS_FILE, lambda handle: handle.write(json.dumps(info.to_json(), indent=2).encode()))
    _fsync_dir(staging)
    os.replace(staging, final)
    _fsync_dir(model_dir)
    if make_current:
        set_current(model_dir, version)
    return info


def set_current(model_dir: Path, version: str) -> None:
    """Atomically point `current` at an existing complete version."""
    model_dir = Path(model_dir)
    if not (model_dir / version / METRICS_FILE).is_file():
        raise FileNotFoundError(f"no complete version {version!r} in {model_dir}")
    temporary = model_dir / f".{CURRENT_FILE}.{secrets.token_hex(4)}"
    _write_file(temporary, lambda handle: handle.write(version.encode()))
    os.replace(temporary, model_dir / CURRENT_FILE)
    _fsync_dir(model_dir)


def current_version(model_dir: Path) -> str | None:
    """The name in `current` if it names a complete version; else the newest complete one."""
    model_dir = Path(model_dir)
    try:
        name = (model_dir / CURRENT_FILE).read_text().strip()
        if name and (model_dir / name / METRICS_FILE).is_file():
            return name
    except OSError:
        pass
    versions = list_versions(model_dir)
    return versions[-1].version if versions else None


def list_versions(model_dir: Path) -> list[VersionInfo]:
    """Complete versions under model_dir, oldest first (incomplete or unreadable ones are skipped)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    infos = []
    for path in model_dir.iterdir():
        if not path.is_dir() or path.name.startswith("."):
            continue
        try:
            infos.append(VersionInfo.read(path))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(infos, key=lambda info: (info.created, info.version))


def load_version(path: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a version directory (one this trainer wrote, e.g. SEG_CHECKPOINT) onto `device`.

    Raises one of LOAD_ERRORS when the version cannot be loaded (refused pickles included)."""
    path = Path(path)
    info = VersionInfo.read(path)
    device = torch.device(device)
    state = torch.load(path / WEIGHTS_FILE, map_location=device, weights_only=True)
    network = build(info.network)
    network.load_state_dict(state)
    network.to(device).eval()
    return LoadedModel(info=info, network=network, device=device)


def load_current(model_dir: Path, device: torch.device | str = "cpu") -> LoadedModel | None:
    """The current version of model_dir, or None when no complete version exists."""
    name = current_version(model_dir)
    return load_version(Path(model_dir) / name, device) if name else None


def remove_incomplete(model_dir: Path, older_than_s: float = 0.0) -> list[Path]:
    """Delete leftovers of interrupted writes, those last modified more than `older_than_s` ago.

    0 (the default) removes every leftover: call it so at startup when nothing else writes. Where
    other processes share MODEL_DIR (RQ workers), pass a delay no write lasts (minutes): a leftover
    that young may be a version being written right now."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    leftovers = [
        p for p in model_dir.iterdir() if p.name.startswith(INCOMPLETE_PREFIX) or p.name.startswith(f".{CURRENT_FILE}.")
    ]
    leftovers = [path for path in leftovers if older_than_s <= 0 or _age_s(path) > older_than_s]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return leftovers


def _age_s(path: Path) -> float:
    """Seconds since `path` was last modified (0 when it is gone already)."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0
