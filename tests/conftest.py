"""Fixtures shared by every test suite (helpers shared by the suites live in tests/support)."""

from __future__ import annotations

from pathlib import Path

import pytest

# The real stack (Label Studio, fake-gcs-server, backend processes): one per session for all suites.
pytest_plugins = ["tests.support.stack_fixtures"]

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout (DSB2018 nuclei, yeast cells); skips where absent."""
    if not (SHARED_DATA / "dsb2018" / "images").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the shared/ folder beside the checkout)")
    return SHARED_DATA


def one_torch_thread_while():
    """One torch thread while the fixture lives: on a 2-core machine shared with other tests, more
    threads only contend (two can be 30x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


one_thread = pytest.fixture(one_torch_thread_while, name="one_thread")
