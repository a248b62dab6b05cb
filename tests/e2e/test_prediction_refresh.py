"""Predictions that stay current, with a real Label Studio 1.23 and `python -m segmentation`.

Label Studio asks /predict only for tasks without a prediction, so a task opened before a model
existed (no prediction) or holding an older version's prediction used to keep it. Here, after
"Start training" promotes a new version, every unlabeled task shows that version's prediction,
read back through Label Studio's API, without anyone deleting or retrieving anything: the
backend's older predictions are gone, another model's prediction and the annotated tasks (their
annotations and predictions) are untouched, and the refreshed prediction is the one /predict gives.
"""

from __future__ import annotations

import time

import pytest
import requests

from tests.e2e.dsb2018 import pick_images, true_mask
from tests.e2e.test_segmentation_training import retrieve_predictions, stored_predictions
from tests.support.payloads import BRUSH_CONFIG, brush

pytestmark = pytest.mark.e2e

N_ANNOTATED = 4
N_UNLABELED = 4
# TRAIN_EVERY high: only "Start training" trains; a short run (the model's quality is not the point)
BACKEND_ENV = {"DEVICE": "cpu", "TRAIN_MINUTES": "0.2", "TRAIN_EVERY": "1000", "SEG_REFRESH_RATE": "20"}
DEADLINE_S = 100.0
OLD_OWN = "seg-20260101-000000-abcd"  # a version of ours that is gone from MODEL_DIR
OTHER_MODEL = "sam-vit_b"


def add_prediction(label_studio, task_id: int, version: str) -> int:
    response = label_studio.http.post(
        f"{label_studio.url}/api/predictions/",
        json={"task": task_id, "result": [], "score": 0.0, "model_version": version},
        timeout=30,
    )
    assert response.status_code == 201, response.text[:300]
    return response.json()["id"]


def annotations_of(label_studio, task_id: int) -> list[dict]:
    response = label_studio.http.get(f"{label_studio.url}/api/tasks/{task_id}/annotations/", timeout=30)
    assert response.status_code == 200, response.text[:300]
    return sorted(({"id": a["id"], "result": a["result"]} for a in response.json()), key=lambda a: a["id"])


def versions_of(label_studio, task_id: int) -> list[str]:
    return sorted(p["model_version"] for p in stored_predictions(label_studio, task_id))


def test_a_new_version_refreshes_the_unlabeled_tasks_predictions(label_studio, start_backend, shared_data):
    started = time.monotonic()
    images = pick_images(shared_data, N_ANNOTATED + N_UNLABELED)
    ls = label_studio.ls
    project = ls.projects.create(title="prediction refresh", label_config=BRUSH_CONFIG)
    task_ids = label_studio.upload_files(project.id, images)
    annotated, unlabeled = task_ids[:N_ANNOTATED], task_ids[N_ANNOTATED:]
    opened_before, with_old, with_other, untouched = unlabeled
    project_key = str(project.id)

    backend = start_backend("segmentation", env=BACKEND_ENV)
    ml = ls.ml.create(project=project.id, url=backend.url, title="U-Net")
    assert ls.ml.get(id=ml.id).state == "CO", f"backend not connected; log: {backend.log_path}"

    # --- before any model: a task opened now gets no prediction
    retrieve_predictions(label_studio, project.id, [opened_before])
    assert stored_predictions(label_studio, opened_before) == []
    # predictions left by earlier versions of this backend, and one of another model
    old_ids = [add_prediction(label_studio, with_old, "untrained"), add_prediction(label_studio, with_old, OLD_OWN)]
    other_id = add_prediction(label_studio, with_other, OTHER_MODEL)
    for path, task_id in zip(images[:N_ANNOTATED], annotated, strict=True):
        ls.annotations.create(id=task_id, result=[brush(true_mask(shared_data, path))])
    annotated_old = add_prediction(label_studio, annotated[0], OLD_OWN)
    annotations_before = {task_id: annotations_of(label_studio, task_id) for task_id in annotated}

    # --- "Start training"; then nobody touches the tasks: the backend refreshes them
    trained_from = time.monotonic()
    ls.ml.train(id=ml.id)
    deadline = time.monotonic() + DEADLINE_S
    version, refresh = None, {}
    while time.monotonic() < deadline:
        health = backend.health()
        training = health.get("projects", {}).get(project_key, {})
        assert training.get("state") != "failed", f"training failed: {training}; log: {backend.log_path}"
        refresh = health.get("refresh", {}).get("projects", {}).get(project_key, {})
        version = training.get("model_version")
        if version and refresh.get("version") == version and refresh.get("state") in ("done", "failed"):
            break
        time.sleep(1)
    refreshed_at = time.monotonic()
    assert version and refresh.get("state") == "done", f"{refresh}; log: {backend.log_path}"
    assert refresh["errors"] == 0 and refresh["refreshed"] == N_UNLABELED, refresh
    assert refresh["unlabeled"] == N_UNLABELED and refresh["listed"] == N_ANNOTATED + N_UNLABELED, refresh

    # --- read back through Label Studio's API
    for task_id in unlabeled:
        current = [p for p in stored_predictions(label_studio, task_id) if p["model_version"] == version]
        assert len(current) == 1, (task_id, versions_of(label_studio, task_id))
        (region,) = current[0]["result"]
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Nucleus"]
        assert 0.0 < current[0]["score"] <= 1.0
    assert versions_of(label_studio, opened_before) == [version]
    assert versions_of(label_studio, with_old) == [version]  # "untrained" and OLD_OWN replaced
    assert versions_of(label_studio, with_other) == sorted([OTHER_MODEL, version])
    assert other_id in [p["id"] for p in stored_predictions(label_studio, with_other)]
    assert not set(old_ids) & {p["id"] for p in stored_predictions(label_studio, with_old)}
    # annotated tasks: annotations as they were, no new prediction, their old one kept
    for task_id in annotated:
        assert annotations_of(label_studio, task_id) == annotations_before[task_id]
        assert version not in versions_of(label_studio, task_id)
    assert [p["id"] for p in stored_predictions(label_studio, annotated[0])] == [annotated_old]

    # --- the refreshed prediction is the one /predict gives for the same task
    task = label_studio.http.get(f"{label_studio.url}/api/tasks/{untouched}", timeout=30).json()
    with requests.Session() as session:
        session.trust_env = False
        answer = session.post(
            f"{backend.url}/predict",
            json={
                "tasks": [{"id": untouched, "data": task["data"]}],
                "project": f"{project.id}.0",
                "label_config": BRUSH_CONFIG,
            },  # fmt: skip
            timeout=60,
        ).json()
    (direct,) = answer["results"]
    (stored,) = [p for p in stored_predictions(label_studio, untouched) if p["model_version"] == version]
    assert direct["model_version"] == version
    assert direct["result"][0]["value"]["rle"] == stored["result"][0]["value"]["rle"]
    assert direct["score"] == pytest.approx(stored["score"])
    print(
        f"setup {trained_from - started:.0f} s; training + refresh of {N_UNLABELED} tasks "
        f"{refreshed_at - trained_from:.0f} s; refresh {refresh}"
    )
