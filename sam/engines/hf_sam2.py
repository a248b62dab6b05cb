"""The `sam2` engine: SAM 2 / 2.1 image models through Hugging Face transformers (`Sam2Model`).

`embed` runs the Hiera image encoder once per image (bf16 autocast on a GPU); `predict` runs the
prompt encoder and mask decoder against that embedding. `predict_with_logits` also returns the
chosen mask's low-resolution logits: passed back as `mask_input` with the next click on the same
region, they make the decoder refine that mask instead of starting over (SAM's iterative
refinement). `PromptEngine` is shared with the `sam3` engine, whose tracker has the same decoder.

Pre/post-processing is `sam.engines.hf_common` (the library's processors need torchvision).
Each call reads only its arguments and the frozen model: embed and predict may run at the same
time in different threads (`independent_embed`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.devices import resolve_device
from backends.settings import Settings
from sam.engines import Box, Points, hf_common, rgb_uint8
from sam.engines.hf_common import Normalisation
from sam.engines.prediction import MaskPrediction, RefiningEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HfEmbedding:
    """One image's embedding.

    features: the decoder's feature pyramid, float32 on the engine's device, finest first
      (SAM 2.1 at 1024: 1x32x256x256, 1x64x128x128, 1x256x64x64 = 16 MiB; SAM 3 at 1008:
      1x32x288x288, 1x64x144x144, 1x256x72x72 = 20.25 MiB).
    original_size: (H, W) of the original image.
    backbone: SAM 3 only, when text prompts are enabled: the ViT output (1 x T*T x C; 1x5184x1024 at
      1008: 20.25 MiB), from which the concept detector's features are derived for a text prompt.
    """

    features: tuple[torch.Tensor, ...]
    original_size: tuple[int, int]
    backbone: torch.Tensor | None = None


SAM2_CHECKPOINTS = (
    "a Hugging Face id (facebook/sam2.1-hiera-tiny, -small, -base-plus, -large) or a directory "
    "written by save_pretrained"
)


class PromptEngine(RefiningEngine):
    """Box / point prompts through a SAM 2-style decoder (`Sam2Model`, `Sam3TrackerModel`)."""

    independent_embed = True  # see sam.embeddings: no state is shared between embed and predict
    supports_text = False  # segment_text(): the sam3 engine with its concept detector

    def __init__(self, model: Any, norm: Normalisation, device: str, bf16: bool | None, name: str) -> None:
        """`bf16` None: bf16 autocast of the image encoder on CUDA only (the decoder stays fp32)."""
        self.device = device
        self.model = model.to(device)
        self.norm = norm
        self.bf16 = device.startswith("cuda") if bf16 is None else bool(bf16)
        self.name = name
        rows, cols = self.model.prompt_encoder.mask_input_size
        self.mask_input_size = (int(rows), int(cols))

    # -- embedding -------------------------------------------------------------------------------

    def embed(self, image: np.ndarray) -> HfEmbedding:
        """HxWx3 uint8 RGB -> HfEmbedding (runs the image encoder)."""
        return self.embed_batch([image])[0]

    @torch.inference_mode()
    def embed_batch(self, images: Sequence[np.ndarray]) -> list[HfEmbedding]:
        """RGB images of any sizes -> one HfEmbedding each, from one encoder call (all are
        resized to the same S x S input)."""
        images = [rgb_uint8(image) for image in images]
        pixels = hf_common.preprocess(images, self.norm).to(self.device)
        with hf_common.autocast(self.device, self.bf16):
            features, backbone = self._encode(pixels)
        # clone: a slice would keep the whole batch's storage alive in the embedding cache
        return [
            HfEmbedding(
                features=tuple(level[i : i + 1].float().clone() for level in features),
                original_size=(int(image.shape[0]), int(image.shape[1])),
                backbone=None if backbone is None else backbone[i : i + 1].float().clone(),
            )
            for i, image in enumerate(images)
        ]

    def _encode(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Bx3xSxS pixel values -> (feature pyramid, backbone output or None)."""
        return list(self.model.get_image_embeddings(pixels)), None

    def embedding_nbytes(self, embedding: HfEmbedding) -> int:
        return hf_common.tensors_nbytes([*embedding.features, embedding.backbone])

    # -- prompts ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict_with_logits(
        self,
        embedding: HfEmbedding,
        box: Box | None = None,
        points: Points | None = None,
        point_labels: Sequence[int] | None = None,
        mask_input: Any = None,
    ) -> MaskPrediction:
        """One prompt (original-image pixels) -> MaskPrediction.

        `mask_input`: the `logits` of an earlier prediction of the same region (refinement).
        A lone box or a single point is ambiguous: three candidates are decoded and the one with
        the highest predicted IoU wins (as the `sam` engine does); otherwise one mask is decoded.
        """
        n_points = 0 if points is None else len(points)
        has_points = n_points > 0
        inputs = hf_common.prompt_tensors(
            box, points if has_points else None, point_labels, embedding.original_size, self.norm.size, self.device
        )
        if mask_input is not None:
            inputs["input_masks"] = hf_common.mask_input_tensor(mask_input, self.mask_input_size, self.device)
        ambiguous = (box is None) != (not has_points) and n_points <= 1
        features = [level.to(self.device) for level in embedding.features]
        output = self.model(image_embeddings=features, multimask_output=ambiguous, **inputs)
        scores = output.iou_scores[0, 0].float()
        best = int(torch.argmax(scores))
        logits = output.pred_masks[0, 0, best].float()
        mask = hf_common.upsample_logits(logits, embedding.original_size) > 0.0
        return MaskPrediction(
            mask=mask.cpu().numpy(),
            score=float(scores[best].clamp(0.0, 1.0)),
            logits=logits.cpu().numpy().astype(np.float32, copy=False),
        )


class Sam2Engine(PromptEngine):
    """SAM 2 / 2.1 (`SAM_ENGINE=sam2`) from a Hugging Face id or a save_pretrained directory."""

    def __init__(self, checkpoint: str | os.PathLike, device: str = "auto", bf16: bool | None = None) -> None:
        from transformers import Sam2Model

        directory = hf_common.resolve_checkpoint(checkpoint, "sam2")
        family = hf_common.checkpoint_family(str(directory))
        if family != "sam2":
            raise ValueError(
                f"SAM_CHECKPOINT={checkpoint}: config.json model_type is not a SAM 2 model "
                f"(found {family or 'another'} family); use SAM_ENGINE={family or 'auto'} or a facebook/sam2.1-hiera-* checkpoint"
            )
        model = hf_common.load_pretrained(Sam2Model, directory, "Sam2Model")
        size = int(model.config.prompt_encoder_config.image_size)
        norm = Normalisation.from_checkpoint(directory, size, hf_common.IMAGENET_DEFAULT)
        super().__init__(model, norm, resolve_device(device), bf16, name=f"sam2-{checkpoint_label(checkpoint)}")
        log.info("SAM 2 %s loaded on %s (input %dpx, bf16 encoder: %s)", checkpoint, self.device, size, self.bf16)

    @classmethod
    def from_settings(cls, settings: Settings) -> Sam2Engine:
        return cls(
            hf_common.required_checkpoint(settings.sam_checkpoint, "sam2", SAM2_CHECKPOINTS), device=settings.device
        )


def checkpoint_label(checkpoint: str | os.PathLike) -> str:
    """A short name for model_version: the id's name or the directory's name."""
    text = str(checkpoint).rstrip("/\\")
    return text.split("/", 1)[1] if hf_common.is_hub_id(text) else Path(text).name
