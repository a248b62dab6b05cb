"""What an engine's prompt decoder returns when asked for its logits (refinement across clicks)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MaskPrediction:
    """mask: HxW bool (original image); score: the model's predicted IoU in [0, 1];
    logits: hxw float32 low-resolution logits of that mask (256x256 for SAM and SAM 2.1, 288x288
    for SAM 3; 256 / 324 KiB), to pass back as `mask_input` to refine the same region."""

    mask: np.ndarray
    score: float
    logits: np.ndarray
