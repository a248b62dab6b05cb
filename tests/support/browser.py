"""Debian's chromium driven by Playwright for Python, for tests/browser.

Never `playwright install` (it downloads a browser): the tests launch /usr/bin/chromium, which
`.ci/run` installs through apt. The flags keep a headless Chromium off the network (this machine's
closed network refuses its background connections) and working as root.

Fixtures (registered by tests/browser/conftest.py):
- `chromium`: one browser per session; skips where /usr/bin/chromium is missing, fails in CI.
- `page`: a fresh context and page per test (1280x900); on a failed test a full-page screenshot is
  saved under `BROWSER_ARTIFACTS` (default run/browser-artifacts/) as <test name>.png.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ci import unavailable

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def artifacts_dir() -> Path:
    path = Path(os.environ.get("BROWSER_ARTIFACTS") or REPO_ROOT / "run" / "browser-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    # Keep each phase's report on the item so the `page` fixture knows whether the test failed.
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def page(chromium, request: pytest.FixtureRequest) -> Iterator[object]:
    context = chromium.new_context(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    context.set_default_timeout(30_000)
    page = context.new_page()
    try:
        yield page
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:120]
            try:
                page.screenshot(path=str(artifacts_dir() / f"{name}.png"), full_page=True)
            except Exception as error:  # noqa: BLE001 - a failed screenshot must not hide the test's failure
                print(f"screenshot of the failed test could not be saved: {error}")
        context.close()
