"""DEVICE -> a torch device: one rule for the SAM and segmentation backends."""

from __future__ import annotations

import pytest
import torch

from backends.devices import resolve_device


def test_auto_picks_cuda_only_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("AUTO") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"


def test_cuda_without_a_cuda_device_and_unknown_names_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("CPU") == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="expected auto, cpu or cuda"):
        resolve_device("mps")
