"""PredictionRefresher against a loopback Label Studio (tasks and predictions API) that records every
request: paging, which tasks are refreshed, which predictions are deleted, the rate bound, errors."""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from backends.label_studio.client import LabelStudioClient
from backends.server.model_base import ModelResponse
from backends.settings import Settings, SettingsError
from segmentation.refresh import (
    BATCH,
    PAGE_SIZE,
    PredictionRefresher,
    RefreshStatus,
    is_own_version,
    is_unlabeled,
)
from tests.support.http_host import HttpHost, RecordedRequest, Reply

TOKEN = "refresh-test-token"
OLD = "seg-20261101-120000-ab12"
NEW = "seg-20261130-050000-cd34"
FINAL = ("done", "failed", "superseded", "stopped")


class FakeTasksApi:
    """Label Studio's /api/tasks (paged, 404 past the end) and /api/predictions/ (list, create,
    delete) over in-memory tasks; `fail[(method, path)]` answers that call with a Reply instead."""

    def __init__(self, tasks: list[dict], predictions: list[dict] | None = None):
        self.tasks = tasks
        self.predictions = list(predictions or [])
        self.fail: dict[tuple[str, str], Reply] = {}
        self.page_answer: dict[int, object] = {}  # page -> a JSON answer to send instead
        self._ids = itertools.count(1000)
        self.host = HttpHost(app=self.handle)

    def handle(self, request: RecordedRequest) -> Reply:
        if request.headers.get("Authorization") != f"Token {TOKEN}":
            return Reply(401, b'{"detail": "no"}')
        failure = self.fail.get((request.method, request.path))
        if failure is not None:
            return failure
        if request.path == "/api/tasks":
            page, size = int(request.query["page"][0]), int(request.query["page_size"][0])
            if page in self.page_answer:
                return _json(200, self.page_answer[page])
            chunk = self.tasks[(page - 1) * size : page * size]
            if not chunk and page > 1:
                return _json(404, {"detail": "Invalid page."})
            counted = [{**t, "total_predictions": len(self.of_task(t["id"]))} if "total_predictions" in t else t
                       for t in chunk]  # fmt: skip
            return _json(200, {"total": len(self.tasks), "tasks": counted})
        if request.path == "/api/predictions/" and request.method == "GET":
            task = int(request.query["task"][0])
            return _json(200, [p for p in self.predictions if p["task"] == task])
        if request.path == "/api/predictions/" and request.method == "POST":
            prediction = {"id": next(self._ids), **request.json()}
            self.predictions.append(prediction)
            return _json(201, prediction)
        if request.path.startswith("/api/predictions/") and request.method == "DELETE":
            prediction_id = int(request.path.split("/")[3])
            self.predictions = [p for p in self.predictions if p["id"] != prediction_id]
            return Reply(204)
        return _json(404, {"detail": "Not found."})

    def of_task(self, task_id: int) -> list[str]:
        return sorted(p["model_version"] for p in self.predictions if p["task"] == task_id)

    def requests(self, method: str, path_prefix: str) -> list[RecordedRequest]:
        return [r for r in self.host.requests if r.method == method and r.path.startswith(path_prefix)]


def _json(status: int, value: object) -> Reply:
    return Reply(status, json.dumps(value).encode(), {"Content-Type": "application/json"})


def task(task_id: int, annotations: int = 0, cancelled: int = 0) -> dict:
    """A listed task (its total_predictions counted by FakeTasksApi when listed)."""
    return {
        "id": task_id,
        "data": {"image": f"/data/upload/1/{task_id}.png"},
        "total_annotations": annotations,
        "cancelled_annotations": cancelled,
        "total_predictions": 0,
    }


def prediction(prediction_id: int, task_id: int, version: str) -> dict:
    return {"id": prediction_id, "task": task_id, "model_version": version, "result": [], "score": 0.1, "model": None}


class FakeProject:
    """A project's model instance as the refresher sees it: serves `version`, predicts every task
    (NumPy numbers in the answer, like the real one), records what it was asked."""

    def __init__(self, refresher: PredictionRefresher, runtime, project_dir: Path, version: str, project_id="3"):
        self.refresher = refresher
        self.runtime = runtime
        self.project_dir = project_dir
        self.project_id = project_id
        self.version = version
        self.asked: list[list[int]] = []
        self.fail_task: int | None = None

    def served_model(self):
        self.refresher.served(self, self.version)
        return SimpleNamespace(info=SimpleNamespace(version=self.version)) if self.version else None

    def predict(self, tasks, context=None, **kwargs) -> ModelResponse:
        self.served_model()
        self.asked.append([t["id"] for t in tasks])
        predictions = []
        for t in tasks:
            region = {"type": "brushlabels", "value": {"rle": np.array([1, 2, 3], dtype=np.uint8)}}
            entry = {"result": [region], "score": np.float32(0.75), "model_version": self.version}
            if t["id"] == self.fail_task:
                entry = {"result": [], "score": 0.0, "model_version": self.version, "error": "image not found"}
            predictions.append(entry)
        return ModelResponse(model_version=self.version, predictions=predictions)


@pytest.fixture
def make(tmp_path):
    """make(tasks, predictions, **settings) -> (api, refresher, project): a started fake Label
    Studio and a refresher pointed at it; everything is stopped afterwards."""
    made = []

    def build(tasks, predictions=None, version=NEW, **settings):
        api = FakeTasksApi(tasks, predictions)
        api.host.start()
        config = Settings(
            label_studio_url=api.host.url,
            label_studio_api_key=TOKEN,
            image_fetch_timeout_s=2.0,
            **{"seg_refresh_rate": 1000.0, **settings},
        )
        runtime = SimpleNamespace(label_studio=LabelStudioClient(config), stopping=threading.Event())
        refresher = PredictionRefresher(config, ["pretrained-tiny"], watch_interval_s=0.2)
        project = FakeProject(refresher, runtime, tmp_path / "models" / "project-3", version)
        made.append((api, runtime))
        return api, refresher, project

    yield build
    for api, runtime in made:
        runtime.stopping.set()
        api.host.stop()


def finished(refresher: PredictionRefresher, project_id: str = "3", version: str = NEW, timeout_s=10.0):
    """The project's refresh status once it reached a final state for `version`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = refresher.status(project_id)
        if status is not None and status.version == version and status.state in FINAL:
            return status
        time.sleep(0.01)
    raise AssertionError(f"no final refresh state after {timeout_s} s: {refresher.status(project_id)}")


# -- pure rules -----------------------------------------------------------------------------------


def test_own_versions_are_ours_and_nothing_else_is():
    known = {"pretrained-segformer", "untrained"}
    assert is_own_version(OLD, set())  # the trainer's naming, even for a version deleted since
    assert is_own_version("pretrained-segformer", known) and is_own_version("untrained", known)
    for other in ("sam-vit_b", "manual import", "seg-2026", "xseg-20261101-120000-ab12", "", None, 5, ["seg"]):
        assert not is_own_version(other, known), other


def test_a_task_is_unlabeled_only_when_both_annotation_counts_are_zero():
    assert is_unlabeled(task(1))
    assert not is_unlabeled(task(1, annotations=1))
    assert not is_unlabeled(task(1, cancelled=1))
    assert not is_unlabeled({"id": 1, "data": {}})  # counts missing: not known to be unlabeled
    assert not is_unlabeled({"id": 1, "data": {}, "total_annotations": "0", "cancelled_annotations": 0})
    assert not is_unlabeled({"id": 1, "data": {}, "total_annotations": False, "cancelled_annotations": 0})
    assert not is_unlabeled({"id": 1, "data": {}, "total_annotations": 0, "cancelled_annotations": None})


def test_the_refresh_rate_must_be_positive_and_bounded():
    assert Settings.from_env({}).seg_refresh and Settings.from_env({}).seg_refresh_rate == 2.0
    assert not Settings.from_env({"SEG_REFRESH": "off"}).seg_refresh
    for bad in ("0", "-1", "nan", "5000"):
        with pytest.raises(SettingsError, match="SEG_REFRESH_RATE"):
            Settings.from_env({"SEG_REFRESH_RATE": bad})
    with pytest.raises(SettingsError, match="SEG_REFRESH_MAX_TASKS"):
        Settings.from_env({"SEG_REFRESH_MAX_TASKS": "-1"})


# -- refreshes against the fake Label Studio ----------------------------------------------------------


def test_every_page_is_read_and_every_unlabeled_task_gets_the_new_version(make):
    # 250 tasks on 3 pages; every 25th has no annotation
    tasks = [task(i, annotations=0 if i % 25 == 0 else 1) for i in range(1, 2 * PAGE_SIZE + 51)]
    api, refresher, project = make(tasks)
    project.served_model()
    status = finished(refresher)
    assert status.state == "done" and status.errors == 0, status
    assert (status.listed, status.unlabeled, status.refreshed, status.current) == (250, 10, 10, 0)
    pages = api.requests("GET", "/api/tasks")
    assert [r.query["page"] for r in pages] == [["1"], ["2"], ["3"]]
    assert all(r.query["page_size"] == [str(PAGE_SIZE)] and r.query["project"] == ["3"] for r in pages)
    assert all(api.of_task(t["id"]) == ([NEW] if t["id"] % 25 == 0 else []) for t in tasks)
    assert all(len(batch) <= BATCH for batch in project.asked)
    posted = api.requests("POST", "/api/predictions/")[0].json()
    assert posted == {"task": 25, "result": [{"type": "brushlabels", "value": {"rle": [1, 2, 3]}}], "score": 0.75,
                      "model_version": NEW}  # fmt: skip
    # a task listed without predictions is asked for them once, just before the write
    assert [r.query["task"] for r in api.requests("GET", "/api/predictions/")] == [[str(i)] for i in range(25, 251, 25)]


def test_a_prediction_label_studio_stored_after_the_listing_is_not_written_twice(make):
    # someone opened the task between the listing (no prediction) and the write: Label Studio
    # stored its own /predict answer of this version meanwhile
    api, refresher, project = make([task(1)], [prediction(1, 1, NEW)])
    api.page_answer[1] = {"total": 1, "tasks": [task(1)]}  # the listing, read before that happened
    project.served_model()
    status = finished(refresher)
    assert (status.refreshed, status.current, status.errors) == (0, 1, 0), status
    assert api.requests("POST", "/api/predictions/") == [] and api.of_task(1) == [NEW]


def test_only_our_older_predictions_of_unlabeled_tasks_are_replaced(make):
    tasks = [task(1), task(2, annotations=1), task(3, cancelled=1),
             task(4), task(5)]  # fmt: skip
    predictions = [
        prediction(1, 1, OLD),
        prediction(2, 1, "untrained"),
        prediction(8, 1, "pretrained-tiny"),  # the fallback model's (zero-shot)
        prediction(3, 1, "sam-vit_b"),  # another backend's
        prediction(4, 1, "imported by hand"),
        prediction(5, 2, OLD),  # an annotated task's: kept
        prediction(6, 3, OLD),  # a cancelled task's: kept
        prediction(7, 4, NEW),  # already current: nothing to do
    ]
    api, refresher, project = make(tasks, predictions)
    project.served_model()
    status = finished(refresher)
    assert (status.listed, status.unlabeled, status.refreshed, status.current, status.errors) == (5, 3, 2, 1, 0)
    assert api.of_task(1) == sorted(["imported by hand", "sam-vit_b", NEW])
    assert api.of_task(2) == [OLD] and api.of_task(3) == [OLD]
    assert api.of_task(4) == [NEW] and api.of_task(5) == [NEW]
    assert sorted(r.path for r in api.requests("DELETE", "/api/predictions/")) == [
        "/api/predictions/1/",
        "/api/predictions/2/",
        "/api/predictions/8/",
    ]
    assert [t for batch in project.asked for t in batch] == [1, 5]
    called = {r.path for r in api.host.requests}
    assert called == {"/api/tasks", "/api/predictions/", "/api/predictions/1/", "/api/predictions/2/",
                      "/api/predictions/8/"}  # fmt: skip


def test_a_failed_write_keeps_the_old_prediction_and_is_reported(make):
    api, refresher, project = make([task(1), task(2)], [prediction(1, 1, OLD)])
    api.fail[("POST", "/api/predictions/")] = _json(400, {"result": ["not a valid region"]})
    project.served_model()
    status = finished(refresher)
    assert status.state == "done" and status.refreshed == 0 and status.errors == 2, status
    assert "HTTP 400" in status.error_samples[0]
    assert api.of_task(1) == [OLD]  # nothing deleted when the new one was not written
    assert api.requests("DELETE", "/api/predictions/") == []


def test_a_task_whose_image_fails_is_counted_and_left_alone(make):
    api, refresher, project = make([task(1), task(2)],
                                   [prediction(1, 1, OLD), prediction(2, 2, OLD)])  # fmt: skip
    project.fail_task = 1
    project.served_model()
    status = finished(refresher)
    assert (status.refreshed, status.errors) == (1, 1) and "image not found" in status.error_samples[0]
    assert api.of_task(1) == [OLD] and api.of_task(2) == [NEW]


@pytest.mark.parametrize(
    "answer",
    [
        Reply(500, b"<html>oops</html>"),
        _json(403, {"detail": "You do not have permission"}),
        _json(200, ["not", "a", "page"]),
        _json(200, {"tasks": "nope"}),
        _json(200, {"tasks": [task(i) for i in range(1, PAGE_SIZE + 2)]}),  # more than asked for
        Reply(200, b"not json"),
    ],
)
def test_a_listing_that_cannot_be_read_fails_the_refresh_with_a_reason(make, answer):
    api, refresher, project = make([task(1)])
    api.fail[("GET", "/api/tasks")] = answer
    project.served_model()
    status = finished(refresher)
    assert status.state == "failed" and status.errors == 1 and status.error_samples, status
    assert api.requests("POST", "/api/predictions/") == []


def test_malformed_tasks_and_predictions_are_skipped(make):
    api, refresher, project = make([])
    api.page_answer[1] = {
        "tasks": [
            "text",
            {"id": "7", "data": {}},
            {"id": True, "data": {}},
            {"id": -1, "data": {}},
            {"id": 8, "data": "x"},
            {**task(9), "total_predictions": 2},
            task(9),  # the same task twice: once
            task(10),
        ]
    }
    api.predictions = [
        prediction(1, 9, OLD),
        {"id": "2", "task": 9, "model_version": OLD},  # no usable id: never deleted
        prediction(3, 11, OLD),  # another task's, listed by a confused server: never deleted
    ]
    project.served_model()
    status = finished(refresher)
    assert (status.listed, status.unlabeled, status.refreshed, status.errors) == (2, 2, 2, 0), status
    assert [t for batch in project.asked for t in batch] == [9, 10]
    assert [r.path for r in api.requests("DELETE", "/api/predictions/")] == ["/api/predictions/1/"]


@pytest.mark.parametrize("answer", [_json(200, {"results": []}), _json(500, {"detail": "boom"}), Reply(200, b"[")])
def test_predictions_that_cannot_be_read_leave_the_task_alone(make, answer):
    api, refresher, project = make([task(1), task(2)], [prediction(1, 1, OLD)])
    api.fail[("GET", "/api/predictions/")] = answer
    project.served_model()
    status = finished(refresher)
    # task 2 was listed without predictions, but they are read again before any write
    assert (status.refreshed, status.errors) == (0, 2) and "task 1" in status.error_samples[0], status
    assert api.of_task(1) == [OLD] and api.of_task(2) == []


def test_the_rate_bounds_the_tasks_handled_per_second(make):
    api, refresher, project = make([task(i) for i in range(1, 13)], seg_refresh_rate=20.0)
    project.served_model()
    status = finished(refresher)
    assert status.refreshed == 12
    times = api.host.times("/api/predictions/")
    # 12 tasks at 20/s: at least 11 / 20 s between the first task's slot and the last one's
    assert times[-1] - times[0] >= (12 - BATCH) / 20 - 0.05, times[-1] - times[0]


def test_at_most_max_tasks_are_predicted(make):
    api, refresher, project = make([task(i) for i in range(1, 11)], seg_refresh_max_tasks=3)
    project.served_model()
    status = finished(refresher)
    assert status.refreshed == 3 and "SEG_REFRESH_MAX_TASKS=3" in status.note
    assert len(api.requests("POST", "/api/predictions/")) == 3


def test_off_means_no_call_to_label_studio(make):
    api, refresher, project = make([task(1)], seg_refresh=False)
    project.served_model()
    assert refresher.status("3") is None and refresher.report()["enabled"] is False
    assert api.host.requests == []


def test_the_same_version_served_again_does_not_refresh_again(make):
    api, refresher, project = make([task(1)])
    project.served_model()
    finished(refresher)
    project.served_model()
    project.served_model()
    assert refresher.status("3").state == "done"
    assert len(api.requests("GET", "/api/tasks")) == 1


def test_a_newer_version_supersedes_the_running_refresh(make):
    tasks = [task(i) for i in range(1, 41)]
    api, refresher, project = make(tasks, version=OLD, seg_refresh_rate=40.0)
    project.served_model()
    deadline = time.monotonic() + 5
    while (refresher.status("3").refreshed if refresher.status("3") else 0) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    project.version = NEW  # promoted meanwhile: the watcher (or the next request) notices
    status = finished(refresher, version=NEW)
    assert status.state == "done" and status.refreshed == 40
    assert all(api.of_task(t["id"]) == [NEW] for t in tasks)  # OLD's predictions replaced too
    assert len(api.requests("POST", "/api/predictions/")) < 80  # the OLD refresh stopped early


def test_the_watcher_notices_a_version_changed_without_any_request(make):
    api, refresher, project = make([task(1)], version=None)
    project.served_model()  # no model yet: watched, nothing to refresh
    assert refresher.status("3") is None and api.host.requests == []
    project.version = OLD  # e.g. the first training in this process, or `current` changed on disk
    finished(refresher, version=OLD)
    project.version = NEW
    assert finished(refresher, version=NEW).refreshed == 1
    assert api.of_task(1) == [NEW]


def test_a_stopping_server_stops_the_refresh(make):
    api, refresher, project = make([task(i) for i in range(1, 101)], seg_refresh_rate=5.0)
    project.served_model()
    deadline = time.monotonic() + 5
    while not api.requests("POST", "/api/predictions/"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    project.runtime.stopping.set()
    status = finished(refresher)
    assert status.state == "stopped" and status.refreshed < 100


def test_an_evicted_project_is_forgotten(make):
    api, refresher, project = make([task(1)])
    project.served_model()
    finished(refresher)
    refresher.forget("3")
    assert refresher.status("3") is None and refresher.report()["projects"] == {}


def test_label_studio_down_is_a_failed_refresh_not_a_crash(make):
    api, refresher, project = make([task(1)])
    api.host.stop()
    project.served_model()
    status = finished(refresher)
    assert status.state == "failed" and "did not answer" in status.error_samples[0]


def test_a_project_id_that_is_not_a_number_is_never_refreshed(make):
    api, refresher, project = make([task(1)])
    project.project_id = ""
    project.served_model()
    assert refresher.report()["projects"] == {} and api.host.requests == []


def test_the_report_lists_settings_and_statuses():
    refresher = PredictionRefresher(Settings(seg_refresh_rate=3.0, seg_refresh_max_tasks=7))
    assert refresher.report() == {"enabled": True, "rate_per_s": 3.0, "max_tasks": 7, "projects": {}}
    assert RefreshStatus(version=NEW, queued=1.0).report()["state"] == "queued"
