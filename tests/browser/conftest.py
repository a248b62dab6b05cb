"""Browser tests: Debian's chromium through Playwright against the real stack (Label Studio, the
backends). Every test here starts real processes, so each is marked `e2e`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.browser import chromium, page, pytest_runtest_makereport  # noqa: F401 - fixtures and hook

BROWSER_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if BROWSER_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
