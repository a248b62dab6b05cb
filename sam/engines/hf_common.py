"""Shared pieces of the Hugging Face `transformers` engines (`sam2`, `sam3`), without torchvision.

The library's `Sam2ImageProcessor` / `Sam3ImageProcessor` import torchvision, which does not import
next to the pinned torch here, so this module does their work with torch alone, step for step:

- image: resize to the model's square input (S x S, aspect ratio NOT kept, as the library does),
  bilinear with antialias on uint8 (torchvision's CPU path), then (x - 255 mean) / (255 std);
- prompts: original-image pixels (x right, y down) -> model frame: x * S / W, y * S / H
  (`Sam2Processor._normalize_coordinates`); the prompt encoder adds the half-pixel shift itself;
- masks: low-resolution logits (S/4 x S/4) -> bilinear (align_corners=False) to H x W, then > 0
  (`post_process_masks`).

Nothing here imports `transformers`: `checkpoint_family` decides the engine from a checkpoint's
config.json or its Hugging Face id alone, so `SAM_ENGINE=auto` stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sam.engines import rgb_uint8

log = logging.getLogger(__name__)

# config.json `model_type` -> engine
SAM2_MODEL_TYPES = ("sam2", "sam2_video")
SAM3_MODEL_TYPES = ("sam3_video", "sam3_tracker", "sam3_tracker_video", "sam3")
# a Hugging Face model id: owner/name, no file extension of a weights file
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".onnx")
# files fetched from the Hub: configs, safetensors weights, tokenizer; never pickles
HUB_FILES = ("*.json", "*.safetensors", "*.txt")

# The processors' defaults, for checkpoints saved without a preprocessor_config.json
IMAGENET_DEFAULT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # Sam2ImageProcessor
IMAGENET_STANDARD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # Sam3ImageProcessor
INSTANCE_MASK_THRESHOLD = 0.5  # on the sigmoid of SAM 3 instance mask logits (post_process_instance_segmentation)


def is_hub_id(checkpoint: str) -> bool:
    """True for `owner/name` strings that are not an existing path nor a weights file name."""
    text = (checkpoint or "").strip()
    return bool(_HF_ID.match(text)) and not os.path.exists(text) and not text.lower().endswith(_WEIGHT_SUFFIXES)


def checkpoint_family(checkpoint: str | None) -> str | None:
    """`sam2` | `sam3` | None for SAM_CHECKPOINT, without loading anything.

    A directory: by its config.json `model_type`; a Hugging Face id: by its name
    (facebook/sam2.1-hiera-small -> sam2, facebook/sam3 -> sam3).
    """
    if not checkpoint:
        return None
    path = Path(checkpoint)
    if path.is_dir():
        return _family_of_model_type(model_type_of(path))
    if is_hub_id(checkpoint):
        name = checkpoint.split("/", 1)[1].lower()
        if name.startswith("sam3") or "-sam3" in name or "_sam3" in name:
            return "sam3"
        if name.startswith("sam2") or "-sam2" in name or "_sam2" in name:
            return "sam2"
    return None


def model_type_of(directory: Path) -> str | None:
    """config.json's model_type, or None where there is no readable config.json."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def _family_of_model_type(model_type: str | None) -> str | None:
    if model_type in SAM2_MODEL_TYPES:
        return "sam2"
    if model_type in SAM3_MODEL_TYPES:
        return "sam3"
    return None


def required_checkpoint(checkpoint: str, engine: str, expected: str) -> str:
    """SAM_CHECKPOINT as set, or ValueError saying what SAM_ENGINE=`engine` needs (`expected`)."""
    if not checkpoint:
        raise ValueError(f"SAM_ENGINE={engine} needs SAM_CHECKPOINT: {expected}")
    return checkpoint


def resolve_checkpoint(checkpoint: str | os.PathLike, engine: str) -> Path:
    """SAM_CHECKPOINT -> a local directory holding config.json and safetensors weights.

    A Hugging Face id is fetched once into the Hugging Face cache (HF_HOME), configs, safetensors
    and tokenizer files only; `HF_TOKEN` authenticates gated repositories (facebook/sam3) and
    `HF_HUB_OFFLINE=1` uses the cache alone.
    """
    text = str(checkpoint).strip()
    path = Path(text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"SAM_CHECKPOINT={text}: the directory has no config.json (write it with save_pretrained)")
        return path
    if not is_hub_id(text):
        raise ValueError(
            f"SAM_CHECKPOINT={text!r} is neither a directory written by save_pretrained nor a Hugging Face "
            f"model id such as {'facebook/sam3' if engine == 'sam3' else 'facebook/sam2.1-hiera-small'}"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=list(HUB_FILES)))
    except Exception as error:  # gated, offline, unknown id, network: say which setting to change
        hint = (
            " (facebook/sam3 is gated: accept its licence on huggingface.co and set HF_TOKEN)"
            if engine == "sam3"
            else ""
        )
        raise ValueError(f"SAM_CHECKPOINT={text}: cannot fetch it from the Hugging Face Hub{hint}: {error}") from error


@dataclass(frozen=True)
class Normalisation:
    """How pixels become model input: S x S resize, then (x * rescale - mean) / std per channel."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255

    @classmethod
    def from_checkpoint(cls, directory: Path, size: int, default: tuple) -> Normalisation:
        """The checkpoint's preprocessor_config.json (or processor_config.json) values, else `default`.

        `size` is the model's own input size (the prompt encoder's image_size): it wins over the
        processor file, as the model cannot take another.
        """
        processor = _processor_config(directory)
        mean = tuple(float(v) for v in processor.get("image_mean", default[0]))
        std = tuple(float(v) for v in processor.get("image_std", default[1]))
        rescale = float(processor.get("rescale_factor", 1 / 255))
        declared = (processor.get("size") or {}).get("height") if isinstance(processor.get("size"), dict) else None
        if declared is not None and int(declared) != size:
            log.warning("%s declares image size %s but the model takes %s: using %s", directory, declared, size, size)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0 or rescale <= 0:
            raise ValueError(f"{directory}: image_mean / image_std / rescale_factor are not usable: {processor}")
        return cls(size=int(size), mean=mean, std=std, rescale_factor=rescale)


def _processor_config(directory: Path) -> dict:
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        try:
            config = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue
        config = config.get(key, {}) if key else config
        if isinstance(config, dict):
            return config
    return {}


def preprocess(images: Sequence[np.ndarray], norm: Normalisation) -> torch.Tensor:
    """RGB uint8 images (any sizes) -> Bx3xSxS float32 pixel values on the CPU.

    Matches the library's torchvision path: uint8 -> bilinear antialiased resize -> uint8, then
    the fused rescale + normalise in float32.
    """
    mean = torch.tensor(norm.mean, dtype=torch.float32) * (1.0 / norm.rescale_factor)
    std = torch.tensor(norm.std, dtype=torch.float32) * (1.0 / norm.rescale_factor)
    batch = [_resize_uint8(rgb_uint8(image), norm.size) for image in images]
    pixels = torch.cat(batch).to(torch.float32)
    return pixels.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))


def _resize_uint8(image: np.ndarray, size: int) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xSxS uint8, as torchvision's `resize(antialias=True)` does on the CPU."""
    tensor = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
    if _native_uint8_bilinear():
        return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    resized = F.interpolate(tensor.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized.round_().to(torch.uint8)


def _native_uint8_bilinear() -> bool:
    # torchvision resizes uint8 natively only where the CPU has AVX2 (else through float32)
    return "AVX2" in torch.backends.cpu.get_cpu_capability() or "AVX512" in torch.backends.cpu.get_cpu_capability()


def prompt_tensors(
    box: Sequence[float] | None,
    points: Sequence[Sequence[float]] | None,
    point_labels: Sequence[int] | None,
    original_size: tuple[int, int],
    size: int,
    device: str,
) -> dict[str, torch.Tensor]:
    """A prompt in original-image pixels -> the model's input_boxes (1x1x4), input_points (1x1xNx2)
    and input_labels (1x1xN), in the S x S model frame."""
    height, width = original_size
    scale = torch.tensor([size / width, size / height], dtype=torch.float32)
    inputs: dict[str, torch.Tensor] = {}
    if box is not None:
        corners = torch.tensor(np.asarray(box, dtype=np.float32).reshape(2, 2)) * scale
        inputs["input_boxes"] = corners.reshape(1, 1, 4).to(device)
    if points is not None and len(points):
        xy = torch.tensor(np.asarray(points, dtype=np.float32).reshape(-1, 2)) * scale
        signs = np.ones(len(xy)) if point_labels is None else np.asarray(point_labels)
        labels = torch.tensor(signs.astype(np.int64).reshape(-1))
        if len(labels) != len(xy):
            raise ValueError(f"{len(xy)} points but {len(labels)} point labels")
        inputs["input_points"] = xy.reshape(1, 1, -1, 2).to(device)
        inputs["input_labels"] = labels.reshape(1, 1, -1).to(device)
    if not inputs:
        raise ValueError("a prompt needs a box or at least one point")
    for value in inputs.values():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError("prompt coordinates must be finite numbers")
    return inputs


def upsample_logits(logits: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """hxw low-resolution logits -> HxW logits of the original image (`post_process_masks`)."""
    return F.interpolate(logits[None, None].float(), original_size, mode="bilinear", align_corners=False)[0, 0]


def mask_input_tensor(mask_input: Any, size: tuple[int, int], device: str) -> torch.Tensor:
    """Previous low-resolution logits (hxw, 1xhxw or 1x1xhxw; numpy or torch) -> 1x1xhxw float32.

    Another size is resized by the model itself (antialiased bilinear), as the library allows.
    """
    tensor = torch.as_tensor(np.asarray(mask_input) if not isinstance(mask_input, torch.Tensor) else mask_input)
    tensor = tensor.to(torch.float32)
    while tensor.ndim > 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2 or min(tensor.shape) < 1 or max(tensor.shape) > 4 * max(size):
        raise ValueError(
            f"mask_input must be {size[0]}x{size[1]} low-resolution logits, got shape {tuple(tensor.shape)}"
        )
    if not torch.isfinite(tensor).all():
        raise ValueError("mask_input holds non-finite logits")
    return tensor[None, None].to(device)


def select_instances(
    pred_logits: torch.Tensor,
    presence_logits: torch.Tensor | None,
    pred_masks: torch.Tensor,
    original_size: tuple[int, int],
    score_threshold: float,
    max_instances: int,
) -> list[tuple[np.ndarray, float]]:
    """SAM 3 detector output of one image (1xQ logits, 1x1 presence, 1xQxhxw mask logits) ->
    [(HxW bool mask, score)], best first: what `post_process_instance_segmentation` keeps (score =
    sigmoid(logit) x sigmoid(presence) > threshold; mask = bilinear sigmoid > 0.5), capped at
    `max_instances` and without empty masks. Masks are upsampled one at a time, so memory stays at
    one HxW float map whatever the number of instances."""
    scores = pred_logits.float().sigmoid()
    if presence_logits is not None:
        scores = scores * presence_logits.float().sigmoid()
    scores = scores[0]
    order = [int(i) for i in torch.argsort(scores, descending=True, stable=True) if scores[i] > score_threshold]
    found = []
    for index in order[: max(0, int(max_instances))]:
        probabilities = pred_masks[0, index].float().sigmoid()
        mask = upsample_logits(probabilities, original_size) > INSTANCE_MASK_THRESHOLD
        if bool(mask.any()):
            found.append((mask.cpu().numpy(), float(scores[index])))
    return found


@contextlib.contextmanager
def autocast(device: str, enabled: bool) -> Iterator[None]:
    """bf16 autocast on `device` when enabled (the image encoders), a no-op otherwise."""
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=enabled):
        yield


def tensors_nbytes(tensors: Sequence[torch.Tensor | None]) -> int:
    return int(sum(t.element_size() * t.nelement() for t in tensors if t is not None))


def load_pretrained(model_class: Any, directory: Path, what: str) -> Any:
    """`model_class.from_pretrained(directory)` in float32 from safetensors only, in eval mode.

    Refuses a checkpoint whose weights do not cover the model: transformers would silently fill
    the missing ones with random values (a SAM 3 engine pointed at a SAM 2 directory, say).
    """
    model, info = model_class.from_pretrained(
        str(directory), use_safetensors=True, dtype=torch.float32, output_loading_info=True
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"SAM_CHECKPOINT={directory}: its weights do not fit {what} ({len(missing)} missing, e.g. {missing[:3]}); "
            "is it a checkpoint of another model family?"
        )
    return model.eval()
