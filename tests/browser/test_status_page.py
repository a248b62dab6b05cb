"""The segmentation backend's status page in Debian's chromium, during a real training run.

Real processes: Label Studio 1.23 (the session's) and `python -m segmentation` (basic auth on
the page is checked in tests/http/test_status_page.py: devstack waits for an open /health). A
BrushLabels project gets synthetic cell images annotated from their true masks; "Start training"
goes to the backend's webhook (as Label Studio sends it), the backend reads the annotations from
Label Studio and trains for a few seconds. The open page must show the run and its loss plot must
grow while the run goes (the page polls /status.json), then show the new version with its
validation Dice. With SAVE_README_SCREENSHOTS=1 the finished page is saved as
docs/images/status-page.png for the README.
"""

from __future__ import annotations

import os
import time

import pytest
import requests
from PIL import Image

from tests.support.browser import REPO_ROOT
from tests.support.images import cells
from tests.support.payloads import BRUSH_CONFIG, brush, webhook_body

N_IMAGES = 8
BACKEND_ENV = {
    "DEVICE": "cpu",
    "TRAIN_MINUTES": "0.3",  # 18 s: long enough to watch the plot grow (two polls), short for CI
    "TRAIN_EVERY": "1000",
    "VAL_FRACTION": "0.25",
}
SCREENSHOT = REPO_ROOT / "docs" / "images" / "status-page.png"


def plot_points(page, project: int, series: str) -> int:
    """How many points the page's plot of `series` holds (status.js writes it on the plot element)."""
    value = page.evaluate(
        """([project, series]) => {
            const card = [...document.querySelectorAll("article.run")].find((c) => c.dataset.project === project);
            const plot = card && card.querySelector(`.plot[data-series="${series}"]`);
            return plot ? Number(plot.dataset.points || 0) : 0;
        }""",
        [str(project), series],
    )
    return int(value)


def field(page, project: int, name: str) -> str:
    card = page.locator(f'article.run[data-project="{project}"]')
    return card.locator(f'dd[data-field="{name}"]').inner_text()


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"{what} within {timeout_s:.0f} s")


@pytest.fixture
def annotated_project(label_studio, tmp_path):
    """A BrushLabels project with N_IMAGES tasks, each annotated with its true mask."""
    paths, truths = [], []
    for index in range(N_IMAGES):
        image, truth = cells(100 + index, (96, 96), disks=4)
        path = tmp_path / f"cells-{index}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
        truths.append(truth)
    project = label_studio.ls.projects.create(title="status page", label_config=BRUSH_CONFIG)
    for task_id, truth in zip(label_studio.upload_files(project.id, paths), truths, strict=True):
        label_studio.ls.annotations.create(id=task_id, result=[brush(truth)])
    return project.id


def test_the_status_page_plots_a_training_run_as_it_goes(label_studio, start_backend, annotated_project, page):
    backend = start_backend("segmentation", env=BACKEND_ENV)
    project = annotated_project
    script_errors: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))

    page.goto(backend.url + "/")
    assert page.locator("h1").inner_text() == "SegmentationBackend"
    assert "No model version yet." in page.locator("section", has_text="Model versions").inner_text()
    assert "TRAIN_MINUTES" in page.locator("section", has_text="Limits in force").inner_text()

    with requests.Session() as session:  # "Start training", as Label Studio posts it
        session.trust_env = False
        response = session.post(
            f"{backend.url}/webhook",
            json=webhook_body("START_TRAINING", project, BRUSH_CONFIG),
            timeout=10,
        )
    assert response.status_code == 200 and response.json()["training"] == "queued", response.text

    # The card appears by itself (no reload) and its loss plot grows while the state is "training".
    card = page.locator(f'article.run[data-project="{project}"]')
    card.wait_for(timeout=20_000)
    first = wait_until(lambda: plot_points(page, project, "loss"), 30, "no loss point on the page")
    assert field(page, project, "state") == "training", field(page, project, "state")
    wait_until(
        lambda: plot_points(page, project, "loss") > first and field(page, project, "state") == "training",
        20,
        "the loss plot did not grow during the run",
    )
    assert card.locator('.plot[data-series="loss"] canvas').count() == 1  # drawn by uPlot
    wait_until(lambda: plot_points(page, project, "val_dice") >= 1, 30, "no validation Dice point")

    # The run ends: the card says which version it made; after a reload the version table lists it.
    version = wait_until(
        lambda: field(page, project, "state") == "idle" and field(page, project, "model_version").strip("-"),
        60,
        f"the run did not finish (log: {backend.log_path})",
    )
    page.reload()
    versions = page.locator("section", has_text="Model versions").inner_text()
    assert version in versions and "(current)" in versions and "Nucleus" in versions, versions
    wait_until(lambda: plot_points(page, project, "val_dice") >= 1, 10, "plots not drawn after a reload")
    assert "images (disk)" in page.locator("section", has_text="Caches").inner_text()
    assert not script_errors, script_errors
    if os.environ.get("SAVE_README_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
