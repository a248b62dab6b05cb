"""What an engine's prompt decoder returns when asked for its logits (refinement across clicks)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam.engines import Box, Points


@dataclass(frozen=True)
class MaskPrediction:
    """mask: HxW bool (original image); score: the model's predicted IoU in [0, 1];
    logits: hxw float32 low-resolution logits of that mask (256x256 for SAM and SAM 2.1, 288x288
    for SAM 3; 256 / 324 KiB), to pass back as `mask_input` to refine the same region."""

    mask: np.ndarray
    score: float
    logits: np.ndarray


class RefiningEngine(ABC):
    """An engine whose decoder gives logits too (`sam`, `sam2`, `sam3`): `predict` is
    `predict_with_logits` without them, and `mask_input` (earlier logits) refines a region."""

    supports_mask_input = True

    def predict(
        self,
        embedding: Any,
        box: Box | None = None,
        points: Points | None = None,
        point_labels: Sequence[int] | None = None,
        mask_input: Any = None,
    ) -> tuple[np.ndarray, float]:
        """One prompt -> (HxW bool mask of the original image, the model's predicted IoU)."""
        prediction = self.predict_with_logits(embedding, box, points, point_labels, mask_input)
        return prediction.mask, prediction.score

    @abstractmethod
    def predict_with_logits(
        self,
        embedding: Any,
        box: Box | None = None,
        points: Points | None = None,
        point_labels: Sequence[int] | None = None,
        mask_input: Any = None,
    ) -> MaskPrediction:
        """One prompt -> MaskPrediction; `mask_input`: the `logits` of an earlier prediction of the
        same region, so an added click refines that mask."""
