"""The segmentation backend through HTTP, with a loopback stand-in for Label Studio's API.

The stand-in serves what the backend reads from Label Studio: uploaded images (with the token
checked), the project export (tasks with their annotations: brush RLE and polygons) and the
project itself. The real Label Studio end to end test lives in tests/e2e.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from backends.masks.rle import decode_rle
from backends.server.app import create_app
from backends.settings import Settings
from segmentation.model import SegmentationBackend
from tests.support import payloads
from tests.support.http_host import PNG, Reply
from tests.support.images import cells, png
from tests.support.label_studio import LEGACY_TOKEN as TOKEN
from tests.support.label_studio import FakeLabelStudio
from tests.support.masks import iou
from tests.support.payloads import annotation, brush

SIZE = (72, 64)  # height, width
CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Nucleus" background="red"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image">
    <Label value="Nucleus" background="blue"/>
  </PolygonLabels>
</View>
"""


def square_polygon(label: str = "Nucleus") -> dict:
    return {
        "id": "p1",
        "from_name": "poly",
        "to_name": "image",
        "type": "polygonlabels",
        "original_width": SIZE[1],
        "original_height": SIZE[0],
        "image_rotation": 0,
        "value": {"points": [[5, 5], [30, 5], [30, 30], [5, 30]], "polygonlabels": [label], "closed": True},
    }


class CellsLabelStudio(FakeLabelStudio):
    """Project 1: tasks 1..8 annotated (brush from the truth, newest wins), plus bad input; 9..11 not.
    `images` {task id: (image, truth)}: uploaded as /data/upload/1/cells-<id>.png."""

    def __init__(self):
        super().__init__()
        self.images = {task_id: cells(task_id, SIZE, disks=3, margin=10, radii=(6, 10)) for task_id in range(1, 12)}
        for task_id, (image, _) in self.images.items():
            self.files[f"/data/upload/1/cells-{task_id}.png"] = Reply(200, png(image), PNG)
        self.projects[1] = CONFIG
        tasks = []
        for task_id in range(1, 9):
            image, truth = self.images[task_id]
            annotations = [
                annotation(10 * task_id, [brush(np.zeros_like(truth) | truth[::-1])], "2026-11-01T10:00:00Z"),
                annotation(10 * task_id + 1, [brush(truth)], "2026-11-02T10:00:00Z"),  # the newest: used
            ]
            if task_id == 1:  # newer but cancelled: ignored
                annotations.append(annotation(19, [brush(~truth)], "2026-11-03T10:00:00Z", cancelled=True))
            if task_id == 2:  # a polygon drawn on top (later region wins)
                annotations[1]["result"].append(square_polygon())
            tasks.append(payloads.task(task_id, f"/data/upload/1/cells-{task_id}.png", annotations=annotations))
        tasks.append(
            payloads.task(
                20,
                "/data/upload/1/cells-1.png",
                annotations=[annotation(200, [brush(self.images[1][1], "Mitochondrion")], "2026-11-02T10:00:00Z")],
            )
        )
        tasks.append(
            payloads.task(
                21,
                "/data/upload/1/missing.png",
                annotations=[annotation(210, [brush(self.images[1][1])], "2026-11-02T10:00:00Z")],
            )
        )
        self.exports[1] = tasks


@pytest.fixture
def label_studio():
    with CellsLabelStudio() as fake:
        yield fake


def backend_settings(label_studio, tmp_path, **fields) -> Settings:
    """Settings of a backend on CPU pointed at the fake Label Studio, its files under `tmp_path`."""
    return dataclasses.replace(
        Settings(),
        label_studio_url=label_studio.url,
        label_studio_api_key=TOKEN,
        model_dir=tmp_path / "models",
        image_cache_dir=tmp_path / "cache",
        device="cpu",
        **fields,
    )


@pytest.fixture
def client(label_studio, tmp_path, one_thread):
    settings = backend_settings(label_studio, tmp_path, train_every=2, train_minutes=0.15, val_fraction=0.25)
    with TestClient(create_app(SegmentationBackend, settings), raise_server_exceptions=False) as test_client:
        yield test_client


def predict(client, task_ids, config=CONFIG) -> list[dict]:
    tasks = [payloads.task(i, f"/data/upload/1/cells-{i}.png") for i in task_ids]
    response = client.post("/predict", json=payloads.predict_body(tasks, config=config))
    assert response.status_code == 200, response.text
    return response.json()["results"]


def project_health(client) -> dict:
    return client.get("/health").json().get("projects", {}).get("1", {})


def wait_for_training(client, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = project_health(client)
        if state.get("state") in ("idle", "failed") and state.get("finished"):
            return state
        time.sleep(0.2)
    raise AssertionError(f"training did not finish in {timeout_s} s: {project_health(client)}")


def webhook(client, action: str) -> None:
    started = time.monotonic()
    response = client.post("/webhook", json=payloads.webhook_body(action, config=CONFIG))
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert time.monotonic() - started < 1.0  # Label Studio waits 1 s for a webhook


def test_before_any_model_there_is_no_prediction_and_health_says_why(client):
    """Not even an empty one: Label Studio would store it and never ask again for that task."""
    setup = client.post("/setup", json=payloads.setup_body(CONFIG, access_token=TOKEN))
    assert setup.status_code == 200 and setup.json()["model_version"] == "untrained"
    assert predict(client, [9, 10]) == []
    health = client.get("/health").json()
    assert health["status"] == "UP" and health["model_state"] == "no model"
    assert "predictions are empty" in health["model_state_detail"]
    assert client.get("/versions").json() == {"versions": []}


def test_annotations_count_towards_train_every(client):
    webhook(client, "ANNOTATION_CREATED")
    deadline = time.monotonic() + 10
    while project_health(client).get("new_annotations") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert project_health(client)["state"] == "idle" and project_health(client)["new_annotations"] == 1
    webhook(client, "ANNOTATION_UPDATED")  # the second of TRAIN_EVERY=2: a run starts
    state = wait_for_training(client)
    assert state["state"] == "idle" and state["reason"] == "ANNOTATION_UPDATED", state
    assert state["new_annotations"] == 0


def test_start_training_then_predict(client, label_studio):
    webhook(client, "START_TRAINING")
    webhook(client, "START_TRAINING")  # while the first run goes: not a second run
    state = wait_for_training(client)
    assert state["state"] == "idle", state
    # What could not be used is reported; the cancelled annotation is not even looked at.
    problems = " ".join(state["problems"])
    assert "Mitochondrion" in problems and "missing.png was not found" in problems and state["problem_count"] == 3
    assert state["samples"] == 8 and state["epoch"] >= 1 and "val_dice" in state

    versions = client.get("/versions").json()["versions"]
    assert len(versions) == 1 and versions[0]["project"] == "1" and versions[0]["current"]
    version = versions[0]["version"]
    assert set(versions[0]["val_dice"]) == {"Nucleus"}
    metrics = client.get("/metrics").text
    assert 'seg_training_runs_total{outcome="ok",project="1"} 1.0' in metrics
    assert "seg_validation_dice" in metrics and "seg_training_epoch" in metrics

    results = predict(client, [9, 10, 11])
    for task_id, prediction in zip([9, 10, 11], results, strict=True):
        assert prediction["model_version"] == version
        assert 0 < prediction["score"] <= 1
        brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        polygons = [r for r in prediction["result"] if r["type"] == "polygonlabels"]
        assert len(brushes) == 1 and brushes[0]["value"]["brushlabels"] == ["Nucleus"]
        assert brushes[0]["from_name"] == "tag" and brushes[0]["to_name"] == "image"
        assert (brushes[0]["original_height"], brushes[0]["original_width"]) == SIZE
        assert 0 < brushes[0]["score"] <= 1
        assert polygons and all(p["value"]["polygonlabels"] == ["Nucleus"] for p in polygons)
        predicted = decode_rle(brushes[0]["value"]["rle"], *SIZE)
        assert iou(predicted, label_studio.images[task_id][1]) > 0.6

    # A failed run (Label Studio down) keeps serving the last good model.
    label_studio.export_status = 500
    webhook(client, "START_TRAINING")
    deadline = time.monotonic() + 30
    while project_health(client).get("state") != "failed" and time.monotonic() < deadline:
        time.sleep(0.1)
    state = project_health(client)
    assert state["state"] == "failed" and "HTTP 500" in state["error"]
    assert state["model_version"] == version
    assert predict(client, [9])[0]["model_version"] == version


def test_restart_serves_the_saved_version(label_studio, tmp_path, one_thread):
    settings = backend_settings(label_studio, tmp_path, train_minutes=0.05)
    with TestClient(create_app(SegmentationBackend, settings)) as first:
        webhook(first, "START_TRAINING")
        assert wait_for_training(first)["state"] == "idle"
        version = first.get("/versions").json()["versions"][0]["version"]
    with TestClient(create_app(SegmentationBackend, settings)) as second:
        assert predict(second, [9])[0]["model_version"] == version
        assert second.post("/setup", json={"project": "1", "schema": CONFIG}).json()["model_version"] == version


def test_seg_checkpoint_serves_an_offline_model_and_drops_labels_the_config_lacks(label_studio, tmp_path, one_thread):
    from segmentation.data import Sample
    from segmentation.trainer import TrainConfig, train

    samples = []
    for task_id in (1, 2, 3):
        image, truth = label_studio.images[task_id]
        mask = truth.astype(np.uint8)
        mask[:, : SIZE[1] // 2] *= 2  # the left half's nuclei are "Mitochondrion"
        samples.append(Sample(f"s{task_id}", image, mask))
    info = train(
        samples,
        ["Nucleus", "Mitochondrion"],
        tmp_path / "offline",
        TrainConfig(minutes=1, max_epochs=6, steps_per_epoch=10, batch_size=4, device="cpu"),
    )
    settings = backend_settings(label_studio, tmp_path, seg_checkpoint=str(info.path))
    with TestClient(create_app(SegmentationBackend, settings)) as client:
        assert client.get("/health").json()["fallback_model"] == info.version
        results = predict(client, [1, 2, 9, 10])
        labels = {label for r in results for region in r["result"] for label in region["value"].get("brushlabels", [])}
        assert all(r["model_version"] == info.version for r in results)
        assert labels == {"Nucleus"}  # the config has no "Mitochondrion": those regions are dropped


def test_start_training_answers_with_a_sentence_the_admin_can_read(client):
    """Label Studio shows the webhook's answer verbatim after "Start training" (it showed "{}")."""
    first = client.post("/webhook", json=payloads.webhook_body("START_TRAINING", config=CONFIG)).json()
    assert first["training"] == "queued" and first["message"].startswith("training queued")
    assert "TRAIN_MINUTES" in first["message"]
    again = client.post("/webhook", json=payloads.webhook_body("START_TRAINING", config=CONFIG)).json()
    assert again["training"].startswith("already") and "is already" in again["message"]
