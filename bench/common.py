"""Shared helpers for the benchmarks: one JSON line per figure, and where it was measured."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable


def emit(figure: str, value: float, unit: str, reference: float | None, **extra) -> dict:
    """Print one JSON line {"figure", "value", "unit", "reference", "ratio", ...extra} and return it.

    ratio = value / reference when a (non-zero) reference is given, else None.
    """
    record = {
        "figure": figure,
        "value": round(float(value), 4),
        "unit": unit,
        "reference": None if reference is None else round(float(reference), 4),
        "ratio": round(float(value) / float(reference), 4) if reference else None,
    }
    record.update(extra)
    print(json.dumps(record), flush=True)
    return record


def machine() -> str:
    """Short description: CPU model, cores, torch version, CUDA device if any."""
    parts = [_cpu_model(), f"{os.cpu_count()} cores"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            parts.append(torch.cuda.get_device_name(0))
    except ImportError:
        parts.append("no torch")
    return ", ".join(parts)


def median_ms(function: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `function()` in milliseconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
