"""Pre-annotation before any training: a pretrained model whose classes cover the project's labels.

The model's own classes are merged into the project's (SEG_LABEL_MAP, see label_map.py): the
probability of a label is the sum of its model classes' probabilities, every other class counts
as background. It is served as the fallback model (segmentation/service.py `load_fallback`) until
a project has a version of its own: SEG_CHECKPOINT=hf:<id> (or a save_pretrained folder), or
SEG_MODEL=hf:<id> when neither SEG_CHECKPOINT nor MODEL_DIR holds a trained version.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from segmentation.hf_network import PREFIX, load_pretrained, source_of
from segmentation.label_map import merge_classes, parse_label_map
from segmentation.versions import METRICS_FILE, LoadedModel, VersionInfo

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class MergedClasses(torch.nn.Module):
    """A network's N-class logits -> (1 + K)-class log-probabilities: class i's probability goes
    to target[i] (0 background, k the k-th label). Softmax of the output gives them back."""

    def __init__(self, network: torch.nn.Module, target: list[int]):
        super().__init__()
        self.network = network
        merge = torch.zeros((len(target), max(target) + 1))
        merge[torch.arange(len(target)), torch.tensor(target)] = 1.0
        self.register_buffer("merge", merge)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.network(pixels).float(), dim=1)
        merged = torch.einsum("bnhw,nc->bchw", probs, self.merge)
        return torch.log(merged.clamp_min(1e-6))


def zero_shot_source(seg_checkpoint: str, seg_model: str, model_dir_has_versions: bool) -> str | None:
    """The pretrained model to serve before training, if any: SEG_CHECKPOINT when it is hf:<id> or a
    save_pretrained folder (config.json, no metrics.json); else SEG_MODEL=hf:<id> when
    SEG_CHECKPOINT is unset and MODEL_DIR has no version of its own."""
    if seg_checkpoint:
        if seg_checkpoint.startswith(PREFIX):
            return source_of(seg_checkpoint)
        folder = Path(seg_checkpoint)
        if (folder / "config.json").is_file() and not (folder / METRICS_FILE).is_file():
            return seg_checkpoint
        return None
    if seg_model.startswith(PREFIX) and not model_dir_has_versions:
        return source_of(seg_model)
    return None


def load_zero_shot(source: str, label_map: str, allow_hub: bool, device: torch.device | str) -> LoadedModel:
    """The pretrained model at `source` with its classes merged into labels (SEG_LABEL_MAP), in
    eval mode on `device`. ValueError when no class becomes a label; OSError when it cannot load."""
    network, spec = load_pretrained(source, allow_hub)
    labels, target = merge_classes(spec.id2label, parse_label_map(label_map))
    if not labels:
        raise ValueError(
            f"none of the classes of {source} ({', '.join(spec.id2label.values())[:200]}) becomes a label: "
            "check SEG_LABEL_MAP (model_class=project_label, comma-separated)"
        )
    info = VersionInfo(
        version=zero_shot_version(source),
        path=Path(source),
        labels=labels,
        network=spec,
        created="",
        training={"zero_shot": source, "model_classes": list(spec.id2label.values())[:200]},
    )
    device = torch.device(device)
    merged = MergedClasses(network, target).to(device).eval()
    return LoadedModel(info=info, network=merged, device=device)


def zero_shot_version(source: str) -> str:
    """The model_version Label Studio shows for zero-shot predictions: pretrained-<model name>."""
    name = _UNSAFE.sub("-", source.rstrip("/").split("/")[-1]).strip("-.") or "model"
    return f"pretrained-{name[:80]}"
