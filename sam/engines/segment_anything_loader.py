"""Import segment-anything's model code with or without torchvision.

`import segment_anything` runs the package `__init__`, which imports `utils/transforms.py`
(torchvision `resize`, `to_pil_image`) and `automatic_mask_generator.py` (torchvision ops). Where
torchvision cannot be imported (this machine and CI: the import raises ImportError or, for a CUDA
wheel next to CPU torch, RuntimeError) we load only what interactive prediction needs --
`segment_anything.modeling`, `build_sam` and `predictor.SamPredictor` -- from the installed package
without running its `__init__`, and provide `segment_anything.utils.transforms` ourselves with the
same `ResizeLongestSide`, resizing exactly like torchvision's PIL path (bilinear `Image.resize`).

No fake `torchvision` module is ever registered: other libraries (monai) probe for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

_PACKAGE = "segment_anything"
_lock = threading.Lock()
_loaded: SegmentAnything | None = None


@dataclass(frozen=True)
class SegmentAnything:
    """The pieces of segment-anything the `sam` engine uses."""

    sam_model_registry: dict[str, Callable[..., Any]]
    build_sam_from_parts: Callable[..., Any]  # build_sam._build_sam(encoder_embed_dim, ...)
    SamPredictor: type
    with_torchvision: bool


class ResizeLongestSide:
    """Torchvision-free twin of `segment_anything.utils.transforms.ResizeLongestSide`.

    Resizes images so the longest side is `target_length`, and maps XY pixel coordinates and XYXY
    boxes of the original image (H, W) into the resized frame. Only the NumPy methods that
    `SamPredictor.set_image` / `predict` call; the `*_torch` ones serve the automatic mask
    generator, which is not loaded here.
    """

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """HxWxC uint8 -> h x w x C uint8 (longest side = target_length), PIL bilinear like torchvision."""
        new_h, new_w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        # torchvision's resize(to_pil_image(img), (h, w)) is PIL Image.resize((w, h), BILINEAR).
        return np.array(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """...x2 XY pixel coordinates of an (H, W) image -> the resized frame (float)."""
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = deepcopy(coords).astype(float)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """Bx4 XYXY boxes of an (H, W) image -> the resized frame."""
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """(H, W) -> (h, w) with the longest side `long_side_length`, rounded half up."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        return int(oldh * scale + 0.5), int(oldw * scale + 0.5)


def torchvision_usable() -> bool:
    """True when `import torchvision` works (a broken CUDA wheel raises RuntimeError, not ImportError)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or RuntimeError "operator torchvision::nms does not exist"
        return False
    return True


def load_segment_anything() -> SegmentAnything:
    """Import segment-anything once per process, through its `__init__` only where torchvision works."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _import_normally() if torchvision_usable() else _import_without_torchvision()
        return _loaded


def _import_normally() -> SegmentAnything:
    sa = importlib.import_module(_PACKAGE)
    build_sam = importlib.import_module(f"{_PACKAGE}.build_sam")
    return SegmentAnything(sa.sam_model_registry, build_sam._build_sam, sa.SamPredictor, True)


def _import_without_torchvision() -> SegmentAnything:
    existing = sys.modules.get(_PACKAGE)
    if existing is None or not hasattr(existing, "__path__"):
        spec = importlib.util.find_spec(_PACKAGE)  # locates the package without executing it
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("segment-anything is not installed (pip install segment-anything==1.0)")
        sys.modules[_PACKAGE] = _namespace(_PACKAGE, list(spec.submodule_search_locations), spec)
        utils_dirs = [f"{path}/utils" for path in spec.submodule_search_locations]
        sys.modules[f"{_PACKAGE}.utils"] = _namespace(f"{_PACKAGE}.utils", utils_dirs)
        transforms = types.ModuleType(f"{_PACKAGE}.utils.transforms")
        vars(transforms)["ResizeLongestSide"] = ResizeLongestSide
        sys.modules[f"{_PACKAGE}.utils.transforms"] = transforms
    build_sam = importlib.import_module(f"{_PACKAGE}.build_sam")
    predictor = importlib.import_module(f"{_PACKAGE}.predictor")
    return SegmentAnything(build_sam.sam_model_registry, build_sam._build_sam, predictor.SamPredictor, False)


def _namespace(name: str, path: list[str], spec: Any = None) -> types.ModuleType:
    """A package module object with `__path__` so submodules import from disk."""
    module = types.ModuleType(name)
    module.__path__ = path
    module.__package__ = name
    if spec is not None:
        module.__spec__ = spec
    return module
