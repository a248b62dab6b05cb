"""Segmentation engines behind one small interface, and the loader that picks one from settings.

The interface (built-in engines follow it too; custom ones need not subclass `Engine`)::

    class MyEngine:
        name = "my-engine"                      # goes into model_version and /health
        def __init__(self): ...                 # no arguments
        def embed(self, image):                 # HxWx3 uint8 RGB -> embedding (anything)
        def predict(self, embedding, box=None, points=None, point_labels=None):
            return mask, score                  # HxW bool for the whole original image, float

`box` is [x0, y0, x1, y1] and `points` [[x, y], ...], in pixel coordinates of the original image
(x to the right, y down); `point_labels` holds 1 (positive) or 0 (negative) per point.
Optional: `embedding_nbytes(embedding) -> int` (sizes the byte-capped embedding cache; the default
sums the numpy / torch buffers found in the embedding), `device` (a string for /health), and
`independent_embed = True` when `embed` and `predict` share no state, so a click may be decoded
while another image is being embedded (otherwise every engine call is serialised by one lock).

Optional, offered by `sam2` and `sam3` (sam.engines.hf_sam2 / hf_sam3):
- `supports_mask_input = True`: `predict(..., mask_input=logits)` and
  `predict_with_logits(embedding, box, points, point_labels, mask_input=None) -> MaskPrediction`
  (mask, score, logits: the hxw float32 low-resolution logits to pass back as `mask_input` when the
  annotator adds a click to the same region, so the decoder refines that mask);
- `supports_text = True` (sam3 with its concept detector): `segment_text(embedding, text,
  score_threshold=0.5, max_instances=100) -> [TextInstance(mask, score), ...]`, one per instance.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from backends.settings import Settings
from sam.embedding_cache import nbytes

log = logging.getLogger(__name__)


Box = Sequence[float]  # [x0, y0, x1, y1] pixels of the original image
Points = Sequence[Sequence[float]]  # [[x, y], ...] pixels of the original image


class Engine(Protocol):
    name: str

    def embed(self, image: np.ndarray) -> Any: ...

    def predict(
        self,
        embedding: Any,
        box: Box | None = None,
        points: Points | None = None,
        point_labels: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, float]: ...


def rgb_uint8(image: np.ndarray) -> np.ndarray:
    """An engine's input as a contiguous HxWx3 uint8 RGB array: HxW grey is repeated into three
    channels, HxWx4 loses its alpha. ValueError for any other shape or an empty image."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    return np.ascontiguousarray(image[:, :, :3].astype(np.uint8, copy=False))


def embedding_nbytes(engine: Any, embedding: Any) -> int:
    """Size of one embedding for the cache: the engine's own `embedding_nbytes` when it has one."""
    sizer = getattr(engine, "embedding_nbytes", None)
    return int(sizer(embedding)) if callable(sizer) else nbytes(embedding)


def load_engine(settings: Settings) -> Any:
    """The engine named by SAM_ENGINE: `auto` | `sam` | `sam2` | `sam3` | `classic` | `package.module:ClassName`.

    `auto` picks by SAM_CHECKPOINT: an existing file is a segment-anything checkpoint (`sam`); a
    directory's config.json model_type (sam2 -> `sam2`; sam3_video / sam3_tracker -> `sam3`) or a
    Hugging Face id (facebook/sam2.1-hiera-small -> `sam2`, facebook/sam3 -> `sam3`) picks a
    transformers engine; anything else gives `classic` with a loud warning (masks from classical
    image processing are far below SAM's).
    """
    from sam.engines.hf_common import checkpoint_family

    choice = (settings.sam_engine or "auto").strip()
    if choice == "auto":
        family = checkpoint_family(settings.sam_checkpoint)
        if settings.sam_checkpoint and Path(settings.sam_checkpoint).is_file():
            choice = "sam"
        elif family is not None:
            choice = family
        else:
            log.warning(
                "!!! SAM_CHECKPOINT %r not found: using the weight-free `classic` engine (colour thresholds, no model); "
                "masks will be much worse than SAM's. Download one with `python -m sam.weights download vit_b` "
                "and set SAM_CHECKPOINT. !!!",
                settings.sam_checkpoint,
            )
            choice = "classic"
    if choice == "sam":
        from sam.engines.segment_anything_engine import SamEngine

        return SamEngine.from_settings(settings)
    if choice == "sam2":
        from sam.engines.hf_sam2 import Sam2Engine

        return Sam2Engine.from_settings(settings)
    if choice == "sam3":
        from sam.engines.hf_sam3 import Sam3Engine

        return Sam3Engine.from_settings(settings)
    if choice == "classic":
        from sam.engines.classic import ClassicEngine

        return ClassicEngine.from_settings(settings)
    if ":" in choice:
        return _custom_engine(choice)
    raise ValueError(f"SAM_ENGINE={choice!r}: expected auto, sam, sam2, sam3, classic or package.module:ClassName")


def _custom_engine(spec: str) -> Any:
    module_name, _, class_name = spec.partition(":")
    try:
        engine_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"SAM_ENGINE={spec!r}: cannot import {class_name} from {module_name}: {error}") from error
    engine = engine_class()
    for method in ("embed", "predict"):
        if not callable(getattr(engine, method, None)):
            raise ValueError(f"SAM_ENGINE={spec!r}: the engine has no {method}() method")
    if not getattr(engine, "name", None):
        engine.name = class_name  # model_version needs a name; custom engines may omit it
    return engine
