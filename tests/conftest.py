"""Fixtures shared by every test suite."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout (DSB2018 nuclei, yeast cells); skips where absent."""
    if not (SHARED_DATA / "dsb2018" / "images").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the shared/ folder beside the checkout)")
    return SHARED_DATA
