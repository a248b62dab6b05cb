"""The `sam` engine: Meta's Segment Anything (vit_h | vit_l | vit_b) from a checkpoint.

`embed` runs the image encoder once per image (the expensive step, bf16 autocast where it helps);
`predict` runs the prompt encoder and mask decoder against that embedding (tens of ms on CPU).
Each call uses its own `SamPredictor` view of the shared model, so an embedding is never stored
inside the model object: two annotators on two images cannot read each other's features.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from backends.devices import resolve_device
from backends.settings import Settings
from sam.engines import Box, Points, rgb_uint8
from sam.engines.prediction import MaskPrediction, RefiningEngine
from sam.engines.sam_fast_encoder import preprocess_batch, use_sdpa_attention
from sam.engines.segment_anything_loader import load_segment_anything

if TYPE_CHECKING:  # segment_anything ships no types: Sam is Any to mypy, named for the reader
    from segment_anything.modeling import Sam

log = logging.getLogger(__name__)

# vit_tiny: a test-only model (tiny image encoder, the real prompt encoder and mask decoder) so the
# whole backend runs on CPU in tests in well under a second per image.
_TINY_ENCODER = dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])
MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "vit_tiny")


@dataclass(frozen=True)
class SamEmbedding:
    """One image's SAM embedding.

    features: 1x256x64x64 float32 tensor on the engine's device.
    original_size: (H, W) of the original image; input_size: (h, w) after resizing the longest side to 1024.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def build_model(model_type: str, checkpoint: str | os.PathLike | None = None) -> Sam:
    """A SAM model of `model_type` in eval mode; weights from `checkpoint` or random when None.

    Checkpoints load with `torch.load(weights_only=True)`: a .pth cannot run code on load.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"SAM_MODEL_TYPE={model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
    sa = load_segment_anything()
    if model_type == "vit_tiny":
        model = sa.build_sam_from_parts(**_TINY_ENCODER, checkpoint=None)
    else:
        model = sa.sam_model_registry[model_type](checkpoint=None)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"SAM checkpoint not found: {path}")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:
            raise ValueError(
                f"SAM checkpoint {path} does not fit SAM_MODEL_TYPE={model_type} "
                f"(sam_vit_b_01ec64.pth is vit_b, sam_vit_l_0b3195.pth vit_l, sam_vit_h_4b8939.pth vit_h)"
            ) from error
    return model.eval()


def save_random_checkpoint(path: str | os.PathLike, model_type: str = "vit_tiny", seed: int = 0) -> Path:
    """Write a randomly initialised (seeded) SAM state dict to `path`; for tests and benchmarks."""
    torch.manual_seed(seed)
    model = build_model(model_type)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


class SamEngine(RefiningEngine):
    """Segment Anything behind the engine interface (see `sam.engines`)."""

    # Each predict builds its own SamPredictor around the given embedding; the networks keep no
    # state, so a click may decode while another image is being encoded (see sam.embeddings).
    independent_embed = True

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        model_type: str = "vit_b",
        device: str = "auto",
        bf16: bool | None = None,
        sdpa: bool = True,
        compile_encoder: bool = False,
    ) -> None:
        """`checkpoint` None gives random weights (same compute as real ones: benchmarks, tests).

        `bf16` None: bf16 autocast of the image encoder on CUDA and on CPU too. Measured on this
        2-core CPU (vit_b, random weights, 360x360 image): set_image 9.3 s fp32 vs 4.3 s bf16;
        embeddings agree to cosine 0.99996 and box masks to IoU 0.998 (min 0.997 over 10 boxes).
        `sdpa`: attention through `scaled_dot_product_attention` (see `sam_fast_encoder`).
        `compile_encoder`: `torch.compile` the image encoder and warm it up now (minutes on a GPU
        for vit_h; then about 2x faster per image there).
        """
        self.device = resolve_device(device)
        self.model_type = model_type
        self.model = build_model(model_type, checkpoint).to(self.device)
        self.bf16 = True if bf16 is None else bf16
        self.sdpa = sdpa
        if sdpa:
            use_sdpa_attention(self.model)
        self.name = f"sam-{model_type}"
        self._sa = load_segment_anything()
        self._encoder = self.model.image_encoder
        self.compiled = compile_encoder
        if compile_encoder:
            self._encoder = torch.compile(self.model.image_encoder)
            self.embed(np.zeros((64, 64, 3), dtype=np.uint8))  # compile now, not on the first click
        log.info(
            "SAM %s loaded on %s (bf16 encoder: %s, SDPA: %s, compiled: %s, checkpoint: %s)",
            model_type,
            self.device,
            self.bf16,
            sdpa,
            compile_encoder,
            checkpoint,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> SamEngine:
        checkpoint = settings.sam_checkpoint or None
        if checkpoint is None:
            raise ValueError("SAM_ENGINE=sam needs SAM_CHECKPOINT (python -m sam.weights download vit_b)")
        return cls(
            checkpoint=checkpoint,
            model_type=settings.sam_model_type,
            device=settings.device,
            sdpa=settings.sam_sdpa,
            compile_encoder=settings.sam_compile,
        )

    def embed(self, image: np.ndarray) -> SamEmbedding:
        """HxWx3 uint8 RGB -> SamEmbedding (runs the image encoder)."""
        return self.embed_batch([image])[0]

    @torch.inference_mode()
    def embed_batch(self, images: Sequence[np.ndarray]) -> list[SamEmbedding]:
        """HxWx3 uint8 RGB images (any sizes) -> one SamEmbedding each, from one encoder call.

        The same preprocessing as `SamPredictor.set_image`; each image is padded to 1024x1024, so
        images of different sizes batch together.
        """
        pixels = [rgb_uint8(image) for image in images]
        batch, original_sizes, input_sizes = preprocess_batch(self.model, pixels, self.device)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=self.bf16):
            features = self._encoder(batch)
        # clone: a slice would keep the whole batch's storage alive in the embedding cache
        return [
            SamEmbedding(features=features[i : i + 1].float().clone(), original_size=original, input_size=resized)
            for i, (original, resized) in enumerate(zip(original_sizes, input_sizes, strict=True))
        ]

    @torch.inference_mode()
    def predict_with_logits(
        self,
        embedding: SamEmbedding,
        box: Box | None = None,
        points: Points | None = None,
        point_labels: Sequence[int] | None = None,
        mask_input: Any = None,
    ) -> MaskPrediction:
        """Decode one prompt -> MaskPrediction (mask, predicted IoU, 256x256 low-res logits).

        `mask_input`: the `logits` of an earlier prediction of the same region, so an added click
        refines that mask (segment-anything's `mask_input`). A lone box or a single point is
        ambiguous: SAM returns three candidates and the one with the highest predicted score wins.
        A box with points, or several points, is decoded once.
        """
        box_array = None if box is None else np.asarray(box, dtype=np.float32).reshape(4)
        point_array = (
            None if points is None or len(points) == 0 else np.asarray(points, dtype=np.float32).reshape(-1, 2)
        )
        label_array = None
        if point_array is not None:
            labels = np.ones(len(point_array)) if point_labels is None else np.asarray(point_labels)
            label_array = labels.astype(np.int64).reshape(-1)
            if len(label_array) != len(point_array):
                raise ValueError(f"{len(point_array)} points but {len(label_array)} point labels")
        if box_array is None and point_array is None:
            raise ValueError("a prompt needs a box or at least one point")
        ambiguous = (box_array is None) != (point_array is None) and (point_array is None or len(point_array) == 1)
        previous = None if mask_input is None else np.asarray(mask_input, dtype=np.float32).reshape(1, 256, 256)
        predictor = self._sa.SamPredictor(self.model)
        predictor.features = embedding.features
        predictor.original_size = embedding.original_size
        predictor.input_size = embedding.input_size
        predictor.is_image_set = True
        masks, scores, low_res = predictor.predict(
            point_coords=point_array,
            point_labels=label_array,
            box=box_array,
            mask_input=previous,
            multimask_output=ambiguous,
        )
        best = int(np.argmax(scores))
        return MaskPrediction(masks[best].astype(bool), float(scores[best]), low_res[best].astype(np.float32))

    def embedding_nbytes(self, embedding: SamEmbedding) -> int:
        return int(embedding.features.element_size() * embedding.features.nelement())
