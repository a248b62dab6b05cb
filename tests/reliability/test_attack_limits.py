"""Work and state any client can create are bounded (issue 8, items 7 and 9).

Each test plays what the attack run did, at a size that runs in seconds, against a backend in
process (starlette TestClient) with a fake image source and a gated engine or a fake training:
- project ids: only MAX_PROJECTS projects stay in memory, /health and /metrics;
- START_TRAINING for many projects: one run at a time (TRAIN_CONCURRENCY), a bounded waiting line
  (TRAIN_QUEUE_MAX, then 429), no duplicate run per project;
- TASKS_CREATED: bodies are not kept while prewarms wait; a full background queue answers 429;
- /predict with many tasks prewarms at most PREWARM_MAX_PER_REQUEST and evicts nobody's embeddings;
- an interactive request with thousands of prompts is refused at once (MAX_PROMPTS_PER_REQUEST);
- label configs: size and depth caps, and parsing linear in the size;
- basic auth half configured: the backend refuses to start.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest
from fastapi.testclient import TestClient

from backends.server.app import create_app
from backends.settings import Settings
from sam.model import SamBackend
from segmentation.model import SegmentationBackend
from tests.reliability.backend_process import REPO_ROOT, clean_environment
from tests.reliability.checks import check_answer, describe
from tests.reliability.conftest import base_settings
from tests.support import payloads
from tests.support.fetcher import FakeImageFetcher
from tests.support.payloads import webhook_body

HEIGHT, WIDTH = 24, 32
EMBEDDING_SHAPE = (HEIGHT, WIDTH, 64)  # 48 KiB per embedding: the cache cap is set in embeddings
EMBEDDING_BYTES = int(np.prod(EMBEDDING_SHAPE))


# -- doubles: an image source, an engine that can be held, a training that can be held ---------------


def grey_images() -> FakeImageFetcher:
    """Every URI is a small grey image; no network."""
    return FakeImageFetcher(default=np.full((HEIGHT, WIDTH, 3), 128, np.uint8))


class GatedEngine:
    """Counts embeddings; `embed` waits while `gate` is clear (a slow engine, held by the test)."""

    name = "attack-gated"
    gate = threading.Event()
    embeds = 0
    lock = threading.Lock()

    @classmethod
    def reset(cls, open_gate: bool = True) -> None:
        cls.embeds = 0
        cls.gate = threading.Event()
        if open_gate:
            cls.gate.set()

    def embed(self, image: np.ndarray) -> np.ndarray:
        with GatedEngine.lock:
            GatedEngine.embeds += 1
        GatedEngine.gate.wait(10)
        return np.zeros(EMBEDDING_SHAPE, np.uint8)

    def predict(self, embedding, box=None, points=None, point_labels=None):
        return np.ones(embedding.shape[:2], bool), 0.5


ENGINE = f"{__name__}:GatedEngine"


def sam_app(tmp_path, **fields) -> TestClient:
    settings = base_settings(tmp_path, sam_engine=ENGINE, **fields)
    return TestClient(create_app(SamBackend, settings, images=grey_images()), raise_server_exceptions=False)


def slow_training_class() -> type[SegmentationBackend]:
    """A SegmentationBackend whose training run waits for `release` and records how many run at once."""

    class SlowTraining(SegmentationBackend):
        release = threading.Event()
        running = 0
        peak = 0
        finished: list[str] = []
        counter_lock = threading.Lock()

        def _train(self) -> None:
            cls = type(self)
            with cls.counter_lock:
                cls.running += 1
                cls.peak = max(cls.peak, cls.running)
            try:
                cls.release.wait(10)
            finally:
                with cls.counter_lock:
                    cls.running -= 1
                    cls.finished.append(self.project_id)
                self._report(state="idle", finished=time.time())

    return SlowTraining


def failing_training_class() -> type[SegmentationBackend]:
    """A SegmentationBackend whose runs fail at once (no training data): real bookkeeping, no torch."""

    class NoData(SegmentationBackend):
        def _training_samples(self, labels, *args, **kwargs):
            return [], []

    return NoData


def segmentation_app(tmp_path, model_class: type[SegmentationBackend], **fields) -> TestClient:
    settings = base_settings(tmp_path, **fields)
    return TestClient(create_app(model_class, settings, images=grey_images()), raise_server_exceptions=False)


def wait_until(condition, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def settle(read, quiet_s: float = 0.3, timeout_s: float = 10.0):
    """Wait until `read()` stops changing for `quiet_s` (background work done); its last value."""
    deadline = time.monotonic() + timeout_s
    value, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return value


def project_labels(metrics_text: str, metric: str) -> set[str]:
    return set(re.findall(rf'^{metric}\{{[^}}]*project="([^"]+)"', metrics_text, flags=re.MULTILINE))


# -- item 7: per-project state ---------------------------------------------------------------------


def test_projects_beyond_max_projects_are_forgotten_so_health_and_memory_stay_bounded(tmp_path):
    model_class = failing_training_class()
    with segmentation_app(tmp_path, model_class) as client:
        cap = 32  # MAX_PROJECTS' default
        for project in range(1, 61):
            response = client.post("/webhook", json=webhook_body("ANNOTATION_CREATED", project))
            assert response.status_code == 200, describe(response)
        settle(lambda: len(client.get("/health").json()["projects"]))  # the old server ran fit in the background
        health = client.get("/health")
        projects = health.json()["projects"]
        assert len(projects) <= cap, f"{len(projects)} projects in /health ({len(health.content)} bytes)"
        assert len(client.app.state.server.instances) <= cap
        assert len(client.app.state.server.runtime.store) <= cap
        assert projects["60"]["new_annotations"] == 1  # the most recent ones are kept
        assert "1" not in projects
        # An evicted project comes back fresh when it is used again.
        assert client.post("/webhook", json=webhook_body("ANNOTATION_CREATED", 1)).status_code == 200
        assert client.get("/health").json()["projects"]["1"]["new_annotations"] == 1
        assert "projects_evicted_total" in client.get("/metrics").text


def test_metric_series_of_evicted_projects_are_removed(tmp_path):
    model_class = failing_training_class()
    with segmentation_app(tmp_path, model_class) as client:
        for project in range(1, 41):
            response = client.post("/webhook", json=webhook_body("START_TRAINING", project))
            assert response.status_code == 200, describe(response)
            wait_until(
                lambda key=str(project): client.get("/health").json()["projects"].get(key, {}).get("state") == "failed",
                what=f"project {project}'s run to fail",
            )
        metrics = client.get("/metrics").text
        listed = project_labels(metrics, "seg_training_runs_total")
        assert 0 < len(listed) <= 32, f"{len(listed)} projects in /metrics"
        assert "40" in listed and "1" not in listed


def test_sam_keeps_at_most_max_projects_instances(tmp_path):
    GatedEngine.reset()
    with sam_app(tmp_path) as client:
        for project in range(1, 41):
            body = payloads.setup_body() | {"project": f"{project}.1762076800"}
            assert client.post("/setup", json=body).status_code == 200
        assert len(client.app.state.server.instances) <= 32
        assert len(client.app.state.server.runtime.store) <= 32


# -- item 7: training queue ------------------------------------------------------------------------


def test_start_training_for_many_projects_runs_one_at_a_time_and_refuses_beyond_the_queue(tmp_path):
    model_class = slow_training_class()
    with segmentation_app(tmp_path, model_class) as client:
        try:
            answers = [
                client.post("/webhook", json=webhook_body("START_TRAINING", project)) for project in range(1, 13)
            ]
            duplicate = client.post("/webhook", json=webhook_body("START_TRAINING", 5))
            time.sleep(0.3)  # the old server started a thread per project: give them time to show
            peak = model_class.peak
            health = client.get("/health").json()
        finally:
            model_class.release.set()
        statuses = [answer.status_code for answer in answers]
        assert peak == 1, f"{peak} training runs at once (TRAIN_CONCURRENCY=1)"
        assert statuses == [200] * 9 + [429] * 3, statuses  # 1 running + TRAIN_QUEUE_MAX=8 waiting
        for refused in answers[9:]:
            check_answer(refused)
            assert "TRAIN_QUEUE_MAX" in refused.json()["error"]
        assert answers[0].json()["training"] == "queued"
        assert duplicate.status_code == 200 and duplicate.json()["training"] == "already queued", duplicate.text
        assert health["training_queue"] == {"running": 1, "waiting": 8, "concurrency": 1, "max_waiting": 8}
        assert health["projects"]["9"]["state"] == "queued"
        wait_until(lambda: len(model_class.finished) == 9, what="the 9 queued runs to finish")
        assert sorted(map(int, model_class.finished)) == list(range(1, 10))  # no duplicate run for project 5


def test_a_project_that_is_training_is_not_evicted(tmp_path):
    model_class = slow_training_class()
    with segmentation_app(tmp_path, model_class) as client:
        try:
            assert client.post("/webhook", json=webhook_body("START_TRAINING", 1)).status_code == 200
            wait_until(lambda: model_class.running == 1, what="the run to start")
            for project in range(2, 42):
                assert client.post("/webhook", json=webhook_body("ANNOTATION_CREATED", project)).status_code == 200
            projects = client.get("/health").json()["projects"]
            assert projects["1"]["state"] == "training"
            assert len(projects) <= 32
        finally:
            model_class.release.set()


# -- item 7: webhook and prewarm queue -----------------------------------------------------------------


def big_tasks(first_id: int, count: int, note_bytes: int) -> list[dict]:
    return [
        payloads.task(first_id + i, f"/data/upload/1/t{first_id + i}.png", meta={"note": "x" * note_bytes})
        for i in range(count)
    ]


def test_tasks_created_bodies_are_not_kept_while_prewarms_wait_and_a_full_queue_answers_429(tmp_path):
    GatedEngine.reset(open_gate=False)  # a slow engine: every prewarm waits
    with sam_app(tmp_path) as client:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            answers = []  # (status, body): a kept response would keep its 2 MB request too
            for project in range(1, 7):  # 6 x 20 tasks of 100 KB: 12 MB of bodies
                body = {
                    "action": "TASKS_CREATED",
                    "tasks": big_tasks(project * 100, 20, 100_000),
                    "project": {"id": project, "label_config": payloads.LABEL_CONFIG},
                }
                response = client.post("/webhook", json=body)
                check_answer(response)
                answers.append((response.status_code, response.json()))
                del body, response
            gc.collect()  # the test client's last request sits in a reference cycle
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            GatedEngine.gate.set()
        assert held < 1_000_000, f"{held / 1e6:.1f} MB held while the prewarms wait"
        statuses = [status for status, _ in answers]
        # 4 workers + BACKGROUND_QUEUE_MAX=64 waiting, 16 per event: the 6th event finds no room.
        assert statuses[:5] == [200] * 5 and statuses[5] == 429, statuses
        assert "BACKGROUND_QUEUE_MAX" in answers[5][1]["error"]
        assert answers[0][1]["prewarm"] == {"queued": 16, "not_prewarmed": 4}


def test_a_generic_model_gets_429_when_the_background_queue_is_full(tmp_path):
    from tests.http.toy_model import ToyModel

    settings = dataclasses.replace(base_settings(tmp_path), background_queue_max=2)
    with TestClient(create_app(ToyModel, settings, images=grey_images()), raise_server_exceptions=False) as client:
        toy = client.app.state.server.service
        toy.fit_gate.clear()  # fit blocks: 4 workers busy, then 2 waiting, then full
        try:
            statuses = [client.post("/webhook", json=webhook_body("START_TRAINING", 1)).status_code for _ in range(8)]
        finally:
            toy.fit_gate.set()
        assert statuses == [200] * 6 + [429] * 2, statuses


# -- item 7: prewarm cap -----------------------------------------------------------------------------------


def click(client, task_id: int, project: str = payloads.PROJECT):
    body = payloads.predict_body(
        [payloads.task(task_id, f"/data/upload/1/a{task_id}.png")],
        {"result": [payloads.rectangle(10, 10, 50, 50, original=(WIDTH, HEIGHT))]},
    )
    return client.post("/predict", json=body | {"project": project})


def test_one_predict_with_many_tasks_prewarms_a_bounded_number_and_evicts_nobodys_embeddings(tmp_path):
    GatedEngine.reset()
    cache_mb = 40 * EMBEDDING_BYTES / 2**20  # room for 40 embeddings
    with sam_app(tmp_path, embedding_cache_mb=cache_mb) as client:
        for task_id in range(20):  # annotators' images, embedded at their clicks
            assert click(client, task_id).status_code == 200
        assert GatedEngine.embeds == 20
        tasks = [payloads.task(1000 + i, f"/data/upload/2/p{i}.png") for i in range(300)]
        started = time.perf_counter()
        response = client.post("/predict", json=payloads.predict_body(tasks) | {"project": "2.1762076800"})
        assert response.status_code == 200 and response.json()["results"] == []
        assert time.perf_counter() - started < 2.0  # answered at once
        prewarmed = settle(lambda: GatedEngine.embeds) - 20
        assert prewarmed <= 16, f"{prewarmed} embeddings prewarmed by one request (PREWARM_MAX_PER_REQUEST=16)"
        for task_id in range(20):  # nobody's embedding was evicted: no new embed at their next click
            assert click(client, task_id).status_code == 200
        assert GatedEngine.embeds - 20 == prewarmed


def test_a_project_has_a_bounded_number_of_prewarms_in_flight(tmp_path):
    GatedEngine.reset(open_gate=False)
    with sam_app(tmp_path) as client:
        try:
            for batch in range(3):  # three "open task" requests while the engine is slow
                tasks = [payloads.task(batch * 100 + i, f"/data/upload/1/b{batch}-{i}.png") for i in range(50)]
                assert client.post("/predict", json=payloads.predict_body(tasks)).status_code == 200
        finally:
            GatedEngine.gate.set()
        assert settle(lambda: GatedEngine.embeds) <= 16


# -- item 7: prompts per request -------------------------------------------------------------------------


def test_an_interactive_request_with_hundreds_of_prompts_is_refused_at_once(tmp_path):
    GatedEngine.reset()
    rectangles = [payloads.rectangle(1 + i % 40, 1 + i % 40, 20, 20, original=(WIDTH, HEIGHT)) for i in range(300)]
    with sam_app(tmp_path) as client:
        task = payloads.task(1, "/data/upload/1/a.png")
        started = time.perf_counter()
        response = client.post("/predict", json=payloads.predict_body([task], {"result": rectangles}))
        elapsed = time.perf_counter() - started
        assert response.status_code == 400, describe(response)
        check_answer(response)
        assert "MAX_PROMPTS_PER_REQUEST" in response.json()["error"] and "300" in response.json()["error"]
        assert elapsed < 1.0 and GatedEngine.embeds == 0  # refused before any image work
        allowed = client.post("/predict", json=payloads.predict_body([task], {"result": rectangles[:64]}))
        assert allowed.status_code == 200 and len(allowed.json()["results"][0]["result"]) == 64


# -- item 7: label config size and depth ----------------------------------------------------------------


def nested_config(depth: int) -> str:
    """A valid config whose Brush tags nest `depth` deep (each one a control tag); the innermost
    has the label."""
    opening = "".join(f'<Brush name="b{i}" toName="image">' for i in range(depth))
    return f'<View><Image name="image" value="$image"/>{opening}<Label value="Nucleus"/>{"</Brush>" * depth}</View>'


def wide_config(kib: int) -> str:
    labels = "".join(f'<Label value="label-{i:06d}"/>' for i in range(kib * 1024 // 26))
    return f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{labels}</BrushLabels></View>'


@pytest.fixture
def segmentation_client(tmp_path):
    with segmentation_app(tmp_path, failing_training_class()) as client:
        yield client


def setup_with(client, config: str):
    started = time.perf_counter()
    response = client.post("/setup", json=payloads.setup_body(config))
    return response, time.perf_counter() - started


def test_a_label_config_over_the_size_cap_is_refused_before_parsing(segmentation_client):
    response, elapsed = setup_with(segmentation_client, wide_config(300))
    assert response.status_code == 400, describe(response)
    check_answer(response)
    assert "LABEL_CONFIG_MAX_KB" in response.json()["error"] and elapsed < 1.0
    ok, _ = setup_with(segmentation_client, wide_config(200))
    assert ok.status_code == 200, describe(ok)


def test_a_deeply_nested_label_config_is_refused_while_parsing(segmentation_client):
    config = nested_config(4800)  # ~250 KiB, under the size cap: 2.5 s of quadratic parsing before
    assert len(config) < 256 * 1024
    response, elapsed = setup_with(segmentation_client, config)
    assert response.status_code == 400, describe(response)
    check_answer(response)
    assert "LABEL_CONFIG_MAX_DEPTH" in response.json()["error"]
    assert elapsed < 1.0, f"/setup took {elapsed:.1f} s"
    ok, _ = setup_with(segmentation_client, nested_config(40))
    assert ok.status_code == 200, describe(ok)


def test_label_config_parsing_is_linear_in_the_config_size():
    from backends.label_studio.label_config import parse_label_config

    config = nested_config(12_000)  # 620 KiB nested 12,000 deep: 11 s before
    started = time.perf_counter()
    parsed = parse_label_config(config, max_kb=1024, max_depth=100_000)
    assert time.perf_counter() - started < 1.5
    assert len(parsed.controls) == 12_000 and parsed.controls[-1].labels == ("Nucleus",)


def test_many_tools_inheriting_many_labels_are_refused_quickly():
    from backends.label_studio.label_config import LabelConfigError, parse_label_config

    tools = "".join(f'<Brush name="t{i}" toName="a,x{i}"/>' for i in range(3000))
    shared = "".join(f'<Labels name="l{j}" toName="a"><Label value="v{j}"/></Labels>' for j in range(2400))
    config = f'<View><Image name="a" value="$image"/>{tools}{shared}</View>'  # 255 KiB: 4 s before
    assert len(config) < 256 * 1024
    started = time.perf_counter()
    with pytest.raises(LabelConfigError, match="inherit"):
        parse_label_config(config)
    assert time.perf_counter() - started < 1.0


# -- item 9: basic auth half configured --------------------------------------------------------------------


@pytest.mark.parametrize("user, password, named", [("", "s3cret", "BASIC_AUTH_USER"), ("ls", "", "BASIC_AUTH_PASS")])
def test_half_configured_basic_auth_refuses_to_start(tmp_path, user, password, named):
    settings = dataclasses.replace(base_settings(tmp_path), basic_auth_user=user, basic_auth_pass=password)
    with pytest.raises(ValueError, match=named):
        create_app(SamBackend, settings, images=grey_images())
    with pytest.raises(ValueError, match=named):
        Settings.from_env({"BASIC_AUTH_USER": user, "BASIC_AUTH_PASS": password})


def test_the_cli_says_what_is_wrong_and_exits_non_zero_on_half_configured_basic_auth(tmp_path):
    env = clean_environment(
        {"BASIC_AUTH_PASS": "s3cret", "IMAGE_CACHE_DIR": str(tmp_path / "cache"), "SAM_ENGINE": "classic"}
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sam", "--host", "127.0.0.1", "--port", "0"],
            check=False,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the backend started serving with BASIC_AUTH_PASS but no BASIC_AUTH_USER")
    assert done.returncode != 0
    assert "BASIC_AUTH_USER" in done.stderr and "Traceback" not in done.stderr, done.stderr
