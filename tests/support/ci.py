"""One rule for a part a test needs that this machine lacks (Label Studio, chromium, redis-server,
nginx, Docker): skip, saying why, except under CI (CI=true), where .ci/run installs everything and a
missing part is a failure, never a skipped test counted as passing."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> NoReturn:
    """Fail under CI, skip elsewhere, with `reason`."""
    if in_ci():
        pytest.fail(f"{reason} (CI must run this test: .ci/run installs what it needs)")
    pytest.skip(reason)
