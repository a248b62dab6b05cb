"""DEVICE -> the torch device a backend's model runs on (one rule for SAM and segmentation)."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    """`auto` (or empty) -> "cuda" when a CUDA device is available, else "cpu"; `cpu`, `cuda` and
    `cuda:N` as given (lower case).

    Raises ValueError for CUDA without a CUDA device, and for any other name.
    """
    import torch  # here: the rest of backends/ runs without torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"DEVICE={device!r}: expected auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"DEVICE={device} but no CUDA device is available")
    return device
