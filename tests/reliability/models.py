"""Model files for the reliability suite: a tiny segmentation version with a known answer, and
checkpoints that run code when unpickled without `weights_only=True`."""

from __future__ import annotations

from pathlib import Path

import torch

LABELS = ("Nucleus", "Cell")


def save_constant_segmentation_model(model_dir: Path, labels: tuple[str, ...] = LABELS, answer: int = 1) -> Path:
    """Write (as the trainer does) a tiny U-Net version that predicts class `answer` (1-based:
    `labels[answer - 1]`) for every pixel of any image; returns the version folder.

    All weights are zero except the last convolution's bias, so the logits are that bias everywhere.
    """
    from segmentation.network import NetworkConfig, build_network
    from segmentation.versions import save_version

    config = NetworkConfig(n_classes=len(labels) + 1, channels=(4, 8), num_res_units=0)
    state = build_network(config).state_dict()
    for name, tensor in state.items():
        if tensor.is_floating_point():
            state[name] = torch.ones_like(tensor) if name.endswith("running_var") else torch.zeros_like(tensor)
    last_bias = [
        name for name, tensor in state.items() if name.endswith("bias") and tensor.shape == (config.n_classes,)
    ][-1]
    bias = torch.zeros(config.n_classes)
    bias[answer] = 8.0
    state[last_bias] = bias
    info = save_version(Path(model_dir), state, labels, config, metrics={"val_dice": dict.fromkeys(labels, 0.5)})
    return info.path


class _CreatesMarker:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def save_malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A torch checkpoint (zip + pickle) holding a plausible state dict plus an object whose
    unpickling creates `marker`: harmless with `torch.load(weights_only=True)`, code execution without."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "payload": _CreatesMarker(Path(marker))}, path)
    return path
