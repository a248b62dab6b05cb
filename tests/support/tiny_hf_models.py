"""Tiny randomly initialised transformers segmentation models, saved with save_pretrained: they
stand in for Hub models in tests (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

# A clothes-parsing model's classes, in the style of segformer_b2_clothes.
CLOTHES_CLASSES = ("Background", "Upper-clothes", "Pants", "Hair")


def save_tiny_segformer(
    folder: Path, classes: tuple[str, ...] = CLOTHES_CLASSES, seed: int = 0, favour: int | None = None
) -> Path:
    """A SegFormer with hidden sizes 8-32 (about 50 k parameters) and these classes, written to
    `folder` (config.json, model.safetensors, preprocessor_config.json); returns `folder`.
    `favour`: that class's head bias is raised so it wins nearly everywhere (a known answer)."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(seed)
    config = SegformerConfig(
        num_channels=3,
        num_encoder_blocks=4,
        depths=[1, 1, 1, 1],
        sr_ratios=[8, 4, 2, 1],
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 1, 2, 2],
        mlp_ratios=[2, 2, 2, 2],
        decoder_hidden_size=32,
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id={name: index for index, name in enumerate(classes)},
    )
    model = SegformerForSemanticSegmentation(config)
    if favour is not None:
        with torch.no_grad():
            model.decode_head.classifier.bias[favour] += 20.0
    model.save_pretrained(folder, safe_serialization=True)
    processor = {
        "image_processor_type": "SegformerImageProcessor",
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.25, 0.25],
    }
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(processor))
    return Path(folder)
