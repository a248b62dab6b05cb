"""Randomly initialised SAM 2 / SAM 3 checkpoints (transformers format) for tests and benchmarks.

`save_random_sam2(dir)` / `save_random_sam3(dir)` write a directory that `SAM_CHECKPOINT=<dir>`
loads like a real one: config.json, model.safetensors, preprocessor_config.json (and, for SAM 3,
a CLIP tokenizer). `tiny=True` (default) gives models that embed in a few ms on a CPU; `tiny=False`
the real architectures (SAM 2.1 hiera-tiny, full SAM 3) with random weights, for timings.

The SAM 3 directory has the layout of facebook/sam3 (a `sam3_video` config; weights under
detector_model.*, tracker_model.*, tracker_neck.*), written from the module names directly:
`Sam3VideoModel.save_pretrained` in transformers 5.23 writes tracker_model.tracker_model.* keys,
which `Sam3TrackerModel.from_pretrained` then leaves unloaded.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

from sam.engines.hf_common import IMAGENET_DEFAULT, IMAGENET_STANDARD

TINY_SAM2_SIZE = 256  # input pixels per side (real SAM 2.1: 1024)
TINY_SAM3_SIZE = 224  # real SAM 3: 1008
TINY_SAM3_PATCH = 14
_TINY_MASK_DECODER: dict[str, Any] = dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
_TINY_SAM3_PROMPTS: dict[str, Any] = dict(hidden_size=32, image_size=TINY_SAM3_SIZE, patch_size=TINY_SAM3_PATCH)


def save_random_sam2(directory: str | Path, tiny: bool = True, seed: int = 0, video: bool = False) -> Path:
    """A random SAM 2 checkpoint; `video` writes a `sam2_video` config (as Hub repos may carry)."""
    from transformers import Sam2Config, Sam2Model, Sam2VideoConfig, Sam2VideoModel

    torch.manual_seed(seed)
    kwargs = _tiny_sam2_parts() if tiny else {}
    size = TINY_SAM2_SIZE if tiny else 1024
    model: Sam2Model | Sam2VideoModel
    if video:
        extra = _tiny_memory_parts(size // 16) if tiny else {}
        model = Sam2VideoModel(Sam2VideoConfig(**kwargs, **extra, image_size=size))
    else:
        model = Sam2Model(Sam2Config(**kwargs))
    directory = Path(directory)
    model.eval().save_pretrained(directory)
    _write_preprocessor_config(directory, size, IMAGENET_DEFAULT)
    return directory


def save_random_sam3(directory: str | Path, tiny: bool = True, seed: int = 0, with_detector: bool = True) -> Path:
    """A random SAM 3 checkpoint: `sam3_video` (tracker + concept detector + tokenizer, as
    facebook/sam3) or, with `with_detector=False`, a `sam3_tracker` one (clicks only)."""
    from safetensors.torch import save_file
    from transformers import Sam3TrackerConfig, Sam3TrackerModel, Sam3VideoConfig, Sam3VideoModel

    torch.manual_seed(seed)
    size = TINY_SAM3_SIZE if tiny else 1008
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if with_detector:
        config = Sam3VideoConfig(**_tiny_sam3_parts()) if tiny else Sam3VideoConfig()
        model = Sam3VideoModel(config).eval()
        config.save_pretrained(directory)
        state = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        _write_clip_tokenizer(directory)
    else:
        parts = _tiny_sam3_tracker_parts() if tiny else {}
        model = Sam3TrackerModel(Sam3TrackerConfig(**parts)).eval()
        model.save_pretrained(directory)
    _write_preprocessor_config(directory, size, IMAGENET_STANDARD)
    return directory


# -- tiny configurations -------------------------------------------------------------------------


def _tiny_sam2_parts() -> dict:
    from transformers.models.sam2.configuration_sam2 import (
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    size = TINY_SAM2_SIZE
    backbone = Sam2HieraDetConfig(
        hidden_size=8,
        num_attention_heads=1,
        image_size=[size, size],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[8, 4, 4, 2],
        global_attention_blocks=[3],  # not a stage's first block (those pool queries)
        window_positional_embedding_background_size=[4, 4],
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=[64, 32, 16, 8],
        backbone_feature_sizes=[[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
        fpn_hidden_size=32,
    )
    return dict(
        vision_config=vision,
        prompt_encoder_config=Sam2PromptEncoderConfig(hidden_size=32, image_size=size, patch_size=16),
        mask_decoder_config=Sam2MaskDecoderConfig(**_TINY_MASK_DECODER),
    )


def _tiny_memory_parts(grid: int) -> dict:
    """The video models' memory modules, tiny (unused by the image engines, but in the checkpoint)."""
    return dict(
        memory_attention_hidden_size=32,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64,
        memory_encoder_hidden_size=32,
        memory_encoder_output_channels=16,
        mask_downsampler_embed_dim=32,
        memory_fuser_embed_dim=32,
        memory_fuser_intermediate_dim=64,
        memory_fuser_num_layers=1,
        memory_attention_rope_feat_sizes=[grid, grid],
    )


def _tiny_sam3_vision():
    from transformers.models.sam3.configuration_sam3 import Sam3VisionConfig, Sam3ViTConfig

    size, grid = TINY_SAM3_SIZE, TINY_SAM3_SIZE // TINY_SAM3_PATCH
    vit = Sam3ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=size,
        patch_size=TINY_SAM3_PATCH,
        window_size=8,
        global_attn_indexes=[1],
        pretrain_image_size=size,
    )
    return Sam3VisionConfig(
        backbone_config=vit, fpn_hidden_size=32, backbone_feature_sizes=[[4 * grid] * 2, [2 * grid] * 2, [grid] * 2]
    )


def _tiny_sam3_tracker_parts() -> dict:
    from transformers.models.sam3_tracker.configuration_sam3_tracker import (
        Sam3TrackerMaskDecoderConfig,
        Sam3TrackerPromptEncoderConfig,
    )

    return dict(
        vision_config=_tiny_sam3_vision(),
        prompt_encoder_config=Sam3TrackerPromptEncoderConfig(**_TINY_SAM3_PROMPTS),
        mask_decoder_config=Sam3TrackerMaskDecoderConfig(**_TINY_MASK_DECODER),
    )


def _tiny_sam3_parts() -> dict:
    """detector_config and tracker_config of a tiny sam3_video checkpoint."""
    from transformers import Sam3Config
    from transformers.models.clip.configuration_clip import CLIPTextConfig
    from transformers.models.sam3.configuration_sam3 import (
        Sam3DETRDecoderConfig,
        Sam3DETREncoderConfig,
        Sam3GeometryEncoderConfig,
        Sam3MaskDecoderConfig,
    )
    from transformers.models.sam3_tracker_video.configuration_sam3_tracker_video import (
        Sam3TrackerVideoConfig,
        Sam3TrackerVideoMaskDecoderConfig,
        Sam3TrackerVideoPromptEncoderConfig,
    )

    size = TINY_SAM3_SIZE
    small: dict[str, Any] = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    text = CLIPTextConfig(
        vocab_size=len(_clip_vocab()),
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    detector = Sam3Config(
        vision_config=_tiny_sam3_vision(),
        text_config=text,
        geometry_encoder_config=Sam3GeometryEncoderConfig(num_layers=1, **small),
        detr_encoder_config=Sam3DETREncoderConfig(num_layers=1, **small),
        detr_decoder_config=Sam3DETRDecoderConfig(num_layers=1, num_queries=12, **small),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=32, num_attention_heads=2),
    )
    tracker = Sam3TrackerVideoConfig(
        vision_config=_tiny_sam3_vision(),
        prompt_encoder_config=Sam3TrackerVideoPromptEncoderConfig(**_TINY_SAM3_PROMPTS),
        mask_decoder_config=Sam3TrackerVideoMaskDecoderConfig(**_TINY_MASK_DECODER),
        # else its __post_init__ resets every size to 1008; it takes image_size from **kwargs,
        # which the generated __init__ signature does not declare
        image_size=size,  # type: ignore[call-arg]
        **_tiny_memory_parts(size // TINY_SAM3_PATCH),
    )
    return dict(detector_config=detector, tracker_config=tracker)


# -- side files ----------------------------------------------------------------------------------


def _write_preprocessor_config(directory: Path, size: int, normalisation: tuple) -> None:
    """What the real repositories carry (the engines read mean, std, rescale factor and size)."""
    config = {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(normalisation[0]),
        "image_std": list(normalisation[1]),
        "rescale_factor": 1 / 255,
        "size": {"height": size, "width": size},
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def _clip_vocab() -> dict[str, int]:
    """Letters as tokens (no merges): every lower-case word tokenizes, one token per letter."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for letter in string.ascii_lowercase:
            vocab[letter + suffix] = len(vocab)
    return vocab


def _write_clip_tokenizer(directory: Path) -> None:
    from transformers import CLIPTokenizer

    CLIPTokenizer(vocab=_clip_vocab(), merges=[]).save_pretrained(str(directory))
