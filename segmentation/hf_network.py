"""Hugging Face `transformers` semantic-segmentation models (`SEG_MODEL=hf:<id or folder>`).

SegFormer, UperNet, DPT, BEiT, MobileViT...: any model `AutoModelForSemanticSegmentation` builds
whose output has `logits` (B x classes x h x w, often a quarter of the input's size). The wrapper
makes them look like the U-Net to the rest of the code: Bx3xHxW normalised input -> BxCxHxW
logits, bilinearly resized to the input. Mask2Former / EoMT answer with mask and class queries
instead (AutoModelForUniversalSegmentation) and are not supported here.

Pretrained weights load with `from_pretrained` (safetensors only), from a local `save_pretrained`
folder, or from the Hub only when SEG_ALLOW_HUB is on (otherwise the local cache alone). The input
normalisation is the one the model's image processor states (`preprocessor_config.json`:
image_mean, image_std), ImageNet's when it has none. A saved version records the model's config,
so it is rebuilt from metrics.json and weights.pt alone, offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from segmentation.normalization import IMAGENET_MEAN, IMAGENET_STD, Normalization

PREFIX = "hf:"
# Names a model gives its background / unlabelled class: never a project label.
BACKGROUND_NAMES = frozenset({"background", "_background_", "unlabeled", "unlabelled", "void", "__background__"})


@dataclass(frozen=True)
class HFNetworkConfig:
    """What is needed to rebuild a transformers network from a saved state_dict."""

    n_classes: int  # labels + background, as in NetworkConfig
    hf_config: dict[str, Any] = field(hash=False)  # the model's config.to_dict(), num_labels = n_classes
    source: str = ""  # the model id or folder it was first loaded from (a record, never loaded again)
    norm: Normalization = Normalization(IMAGENET_MEAN, IMAGENET_STD)
    size_multiple: int = 32  # SegFormer's coarsest stage is 1/32 of the input

    family = "hf"

    @property
    def normalization(self) -> Normalization:
        return self.norm

    @property
    def id2label(self) -> dict[int, str]:
        """The model's class names by index, as its config states them."""
        names = self.hf_config.get("id2label") or {}
        return {int(index): str(name) for index, name in names.items()}

    def to_json(self) -> dict:
        return {
            "family": self.family,
            "n_classes": self.n_classes,
            "hf_config": self.hf_config,
            "source": self.source,
            "normalization": self.norm.to_json(),
            "size_multiple": self.size_multiple,
        }

    @classmethod
    def from_json(cls, data: dict) -> HFNetworkConfig:
        return cls(
            n_classes=int(data["n_classes"]),
            hf_config=dict(data["hf_config"]),
            source=str(data.get("source", "")),
            norm=Normalization.from_json(data.get("normalization")),
            size_multiple=int(data.get("size_multiple", 32)),
        )


class HFSegmenter(torch.nn.Module):
    """A transformers segmentation model as Bx3xHxW -> BxCxHxW logits at the input's size."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = self.model(pixel_values=pixels).logits
        if logits.shape[-2:] != pixels.shape[-2:]:
            logits = torch.nn.functional.interpolate(
                logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False
            )
        return logits


def build_hf_network(config: HFNetworkConfig) -> HFSegmenter:
    """Randomly initialised weights of the recorded architecture (load_state_dict follows)."""
    from transformers import AutoConfig, AutoModelForSemanticSegmentation

    settings = dict(config.hf_config)
    model_config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    return HFSegmenter(AutoModelForSemanticSegmentation.from_config(model_config))


def source_of(model: str) -> str:
    """ "hf:nvidia/segformer-b0-..." -> "nvidia/segformer-b0-..." (a Hub id or a folder)."""
    source = model.removeprefix(PREFIX).strip()
    if not source:
        raise ValueError(f"{model!r} names no model: expected hf:<Hub id or save_pretrained folder>")
    return source


def model_classes(source: str, allow_hub: bool) -> dict[int, str]:
    """The pretrained model's id2label (class index -> name), from its config alone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, local_files_only=not allow_hub)
    return {int(index): str(name) for index, name in config.id2label.items()}


def load_pretrained(source: str, allow_hub: bool) -> tuple[HFSegmenter, HFNetworkConfig]:
    """The model at `source` (Hub id or folder) with its own classes and head, on the CPU.

    Raises OSError (not found, no safetensors, not in the cache without SEG_ALLOW_HUB) or
    ValueError (not a semantic-segmentation model).
    """
    from transformers import AutoModelForSemanticSegmentation

    model = AutoModelForSemanticSegmentation.from_pretrained(
        source, local_files_only=not allow_hub, use_safetensors=True
    )
    config = HFNetworkConfig(
        n_classes=int(model.config.num_labels),
        hf_config=model.config.to_dict(),
        source=source,
        norm=processor_normalization(source, allow_hub),
        size_multiple=32,
    )
    return HFSegmenter(model), config


def processor_normalization(source: str, allow_hub: bool) -> Normalization:
    """image_mean / image_std of the model's image processor (ImageNet's when it states none)."""
    from transformers.utils import cached_file

    path = cached_file(
        source,
        "preprocessor_config.json",
        local_files_only=not allow_hub,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if not path:
        return Normalization(IMAGENET_MEAN, IMAGENET_STD)
    processor = json.loads(Path(path).read_text())
    if processor.get("do_normalize") is False:
        return Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    mean, std = processor.get("image_mean", IMAGENET_MEAN), processor.get("image_std", IMAGENET_STD)
    if isinstance(mean, (int, float)):
        mean = [mean] * 3
    if isinstance(std, (int, float)):
        std = [std] * 3
    return Normalization.from_json({"mean": mean, "std": std})
