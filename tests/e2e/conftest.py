"""The end-to-end suite: every test here starts real processes (the fixtures are in
tests/support/stack_fixtures.py, shared with the other real-stack suites)."""

from __future__ import annotations

from pathlib import Path

import pytest

E2E_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test in this folder starts real processes: mark it even if its module forgets.
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
