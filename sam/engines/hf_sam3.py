"""The `sam3` engine: SAM 3 through Hugging Face transformers.

- Boxes / points (and `mask_input` refinement): `Sam3TrackerModel`, the same decoder as SAM 2.
- Text / concept prompts ("dress", "nucleus"): `Sam3Model`, the concept detector, which finds
  every instance of the concept: `segment_text(embedding, text) -> [TextInstance(mask, score)]`.

Both load from one checkpoint (facebook/sam3, a `sam3_video` config, or a local copy of it) and
share one ViT backbone: `embed` runs it once per image; the tracker's neck turns its output into
the decoder's features, and the backbone output is kept in the embedding so a text prompt on that
image needs only the detector's neck and heads, not another pass of the ViT. A `sam3_tracker`
checkpoint (no detector) gives clicks without text prompts.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Any, NamedTuple

import numpy as np
import torch

from backends.devices import resolve_device
from backends.errors import BadRequest
from backends.settings import Settings
from sam.engines import hf_common
from sam.engines.hf_common import Normalisation
from sam.engines.hf_sam2 import HfEmbedding, PromptEngine, checkpoint_label
from sam.text_prompts import MAX_TEXT_CHARS

log = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 32  # as Sam3Processor pads and truncates


class TextInstance(NamedTuple):
    """One instance of a concept: HxW bool mask of the original image and its score in [0, 1]
    (the detector's instance probability times its presence probability)."""

    mask: np.ndarray
    score: float


SAM3_CHECKPOINTS = (
    "facebook/sam3 (gated: accept the licence on huggingface.co and set HF_TOKEN) or a directory "
    "written by save_pretrained"
)


class Sam3Engine(PromptEngine):
    """SAM 3 (`SAM_ENGINE=sam3`): clicks and boxes, plus text prompts when the checkpoint has the detector."""

    def __init__(
        self, checkpoint: str | os.PathLike, device: str = "auto", bf16: bool | None = None, text: bool = True
    ) -> None:
        """`text` False skips the concept detector (less memory; `segment_text` then refuses)."""
        from transformers import Sam3TrackerModel

        directory = hf_common.resolve_checkpoint(checkpoint, "sam3")
        model_type = hf_common.model_type_of(directory)
        if hf_common.checkpoint_family(str(directory)) != "sam3" or model_type == "sam3":
            raise ValueError(
                f"SAM_CHECKPOINT={checkpoint}: config.json model_type {model_type!r} is not a SAM 3 checkpoint with "
                "the interactive tracker; use facebook/sam3 (model_type sam3_video) or a sam3_tracker directory"
            )
        tracker = hf_common.load_pretrained(Sam3TrackerModel, directory, "Sam3TrackerModel")
        self.detector, self.tokenizer = None, None
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer's padding state is not thread-safe
        if text and model_type == "sam3_video":
            self.detector, self.tokenizer = _load_detector(directory, tracker)
        size = int(tracker.config.prompt_encoder_config.image_size)
        norm = Normalisation.from_checkpoint(directory, size, hf_common.IMAGENET_STANDARD)
        super().__init__(tracker, norm, resolve_device(device), bf16, name=f"sam3-{checkpoint_label(checkpoint)}")
        if self.detector is not None:
            self.detector = self.detector.to(self.device)
        backbone_config = tracker.config.vision_config.backbone_config
        self.grid = size // int(backbone_config.patch_size)  # ViT tokens per side
        self.supports_text = self.detector is not None
        log.info(
            "SAM 3 %s loaded on %s (input %dpx, bf16 encoder: %s, text prompts: %s)",
            checkpoint,
            self.device,
            size,
            self.bf16,
            self.supports_text,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Sam3Engine:
        return cls(
            hf_common.required_checkpoint(settings.sam_checkpoint, "sam3", SAM3_CHECKPOINTS), device=settings.device
        )

    # -- embedding: one ViT pass serves both the tracker and the detector ------------------------

    def _encode(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        hidden = self.model.vision_encoder.backbone(pixels).last_hidden_state  # B x T*T x C
        return tracker_features(self.model, hidden, self.grid), (hidden if self.supports_text else None)

    # -- text / concept prompts ------------------------------------------------------------------

    @torch.inference_mode()
    def segment_text(
        self,
        embedding_or_image: HfEmbedding | np.ndarray,
        text: str,
        score_threshold: float = 0.5,
        max_instances: int = 100,
    ) -> list[TextInstance]:
        """Every instance of the concept `text` in the image -> TextInstances, best score first.

        Keeps instances scoring above `score_threshold` (at most `max_instances`), each with a
        non-empty mask; the same selection and mask thresholding as the library's
        `post_process_instance_segmentation`.
        """
        if not self.supports_text:
            raise BadRequest(
                f"engine {self.name} has no text prompts: SAM_CHECKPOINT must be the full facebook/sam3 checkpoint"
            )
        phrase = _concept(text)
        if not isinstance(score_threshold, (int, float)) or not math.isfinite(score_threshold):
            raise BadRequest(f"score_threshold must be a number in [0, 1], got {score_threshold!r}")
        embedding = (
            embedding_or_image if isinstance(embedding_or_image, HfEmbedding) else self.embed(embedding_or_image)
        )
        if embedding.backbone is None:
            raise ValueError("this embedding was made without the backbone output text prompts need")
        output = self._detect(embedding, phrase)
        found = hf_common.select_instances(
            output.pred_logits,
            output.presence_logits,
            output.pred_masks,
            embedding.original_size,
            score_threshold,
            max_instances,
        )
        return [TextInstance(mask, score) for mask, score in found]

    def _detect(self, embedding: HfEmbedding, phrase: str) -> Any:
        """The detector's raw output for one phrase, from the embedding's backbone output."""
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        detector, tokenizer, backbone = self.detector, self.tokenizer, embedding.backbone
        if detector is None or tokenizer is None or backbone is None:  # segment_text refused these already
            raise ValueError("text prompts need the concept detector and the embedding's backbone output")
        length = min(MAX_TEXT_TOKENS, int(detector.config.text_config.max_position_embeddings))
        with self._tokenizer_lock:
            tokens = tokenizer([phrase], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        hidden = backbone.to(self.device)
        with hf_common.autocast(self.device, self.bf16):
            spatial = hidden.view(hidden.shape[0], self.grid, self.grid, -1).permute(0, 3, 1, 2)
            fpn_hidden_states, fpn_position_encoding = detector.vision_encoder.neck(spatial)
            vision = Sam3VisionEncoderOutput(
                last_hidden_state=hidden,
                fpn_hidden_states=fpn_hidden_states,
                fpn_position_encoding=fpn_position_encoding,
            )
            return detector(
                vision_embeds=vision,
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )


def tracker_features(model: Any, hidden: torch.Tensor, grid: int) -> list[torch.Tensor]:
    """ViT output (B x T*T x C) -> the tracker decoder's feature pyramid, exactly as
    `Sam3TrackerModel.get_image_embeddings` derives it from pixel values (see the test that checks
    it bit for bit). As there, `no_memory_embedding` goes to the neck's last (0.5x) level, which
    the three decoder levels then leave out."""
    batch = hidden.shape[0]
    spatial = hidden.view(batch, grid, grid, -1).permute(0, 3, 1, 2)
    levels, _ = model.vision_encoder.neck(spatial)
    levels = list(levels)
    levels[0] = model.mask_decoder.conv_s0(levels[0])
    levels[1] = model.mask_decoder.conv_s1(levels[1])
    flat = [level.flatten(2).permute(2, 0, 1) for level in levels]
    flat[-1] = flat[-1] + model.no_memory_embedding
    return [
        level.permute(1, 2, 0).view(batch, -1, *size)
        for level, size in zip(flat, model.backbone_feature_sizes, strict=False)  # 4 neck levels, 3 sizes
    ]


def _load_detector(directory: Any, tracker: Any) -> tuple[Any, Any]:
    """The concept detector and its tokenizer, sharing the tracker's ViT backbone (same weights in
    a sam3_video checkpoint: one copy in memory instead of two)."""
    from transformers import AutoTokenizer, Sam3Model

    detector = hf_common.load_pretrained(Sam3Model, directory, "Sam3Model")
    if not _same_weights(tracker.vision_encoder.backbone, detector.vision_encoder.backbone):
        raise ValueError(f"SAM_CHECKPOINT={directory}: the tracker's and the detector's backbones differ")
    detector.vision_encoder.backbone = tracker.vision_encoder.backbone
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as error:
        raise ValueError(f"SAM_CHECKPOINT={directory}: no usable tokenizer for text prompts ({error})") from error
    return detector, tokenizer


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def _concept(text: Any) -> str:
    """A text prompt from a request -> the phrase, or BadRequest."""
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("a text prompt needs a concept, e.g. 'dress' or 'nucleus'")
    phrase = " ".join(text.split())
    if len(phrase) > MAX_TEXT_CHARS:
        raise BadRequest(f"a text prompt is a short concept (at most {MAX_TEXT_CHARS} characters), got {len(phrase)}")
    return phrase
