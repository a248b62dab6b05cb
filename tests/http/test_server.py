"""The protocol server through HTTP, with payloads shaped like Label Studio 1.23's."""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from backends.server.app import create_app
from backends.server.cli import build_parser
from backends.server.model_base import LabelStudioMLBase
from backends.settings import Settings
from devstack.processes import free_port
from tests.conftest import REPO_ROOT
from tests.http.toy_model import LABEL_CONFIG, TEXT_ONLY_CONFIG, FakeLabelStudio, ToyModel, ToyService
from tests.support import payloads
from tests.support.http_host import HttpHost, Reply, closed_port_url

TOKEN = "0123456789abcdef-secret-token"


ls_task = payloads.task  # a task as Label Studio serialises it for an ML backend


def setup_body(config: str = LABEL_CONFIG) -> dict:
    return payloads.setup_body(config, access_token=TOKEN)


def predict_body(tasks: list[dict], context: dict | None = None, label_config: str | None = LABEL_CONFIG) -> dict:
    return payloads.predict_body(tasks, context, label_config)


SMART_RECTANGLE = {
    "result": [payloads.rectangle(10.0, 20.0, 15.5, 12.25, original=(640, 480), id="a1b2c3", from_name="rect")]
}
KEYPOINT = {"result": [payloads.keypoint(30.0, 40.0, original=(640, 480), width=0.5, id="k1", from_name="kp")]}


def ls_project(config: str = LABEL_CONFIG) -> dict:
    return payloads.project(config)


@pytest.fixture
def model_class() -> type[LabelStudioMLBase]:
    return ToyModel


@pytest.fixture
def label_studio() -> FakeLabelStudio:
    return FakeLabelStudio()


def make_client(model_class, label_studio, **settings_fields) -> TestClient:
    settings = dataclasses.replace(Settings(), **settings_fields)
    app = create_app(model_class, settings, label_studio=label_studio)
    return TestClient(app, raise_server_exceptions=False)


def toy_of(client: TestClient) -> ToyService:
    """What ToyModel.startup returned for this app: its record of calls."""
    return client.app.state.server.service


@pytest.fixture
def client(model_class, label_studio):
    with make_client(model_class, label_studio) as test_client:
        yield test_client


@pytest.fixture
def toy(client) -> ToyService:
    return toy_of(client)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(3) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(4))
    return 0.0


def assert_healthy(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "UP"


# -- health, setup ---------------------------------------------------------------------------


def test_health_reports_up_with_model_fields(client, model_class):
    for path in ("/health", "/"):
        response = client.get(path)
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "UP"
        assert body["model_class"] == model_class.__name__
        assert body["engine"] == "toy"


def test_startup_runs_once_per_app_with_the_context(client, toy, label_studio):
    assert client.app.state.server.service is toy  # what startup returned, held by the app
    assert toy.runtime is client.app.state.server.runtime
    assert toy.runtime.label_studio is label_studio


def test_health_is_degraded_when_label_studio_does_not_answer(model_class):
    label_studio = FakeLabelStudio(url="http://127.0.0.1:9", reachable=False)
    with make_client(model_class, label_studio) as client:
        body = wait_for_label_studio_verdict(client)
        assert body["status"] == "DEGRADED"
        assert body["label_studio"] == "unreachable"
        probes = label_studio.probes
        for _ in range(20):
            client.get("/health")
        assert label_studio.probes == probes  # the verdict is cached, not re-probed per request


def test_health_answers_fast_while_the_label_studio_probe_hangs(model_class):
    label_studio = FakeLabelStudio(url="http://127.0.0.1:9", probe_seconds=3.0)
    with make_client(model_class, label_studio) as client:
        started = time.perf_counter()
        response = client.get("/health")
        assert time.perf_counter() - started < 1.0  # Label Studio's timeout; the probe takes 3 s
        assert response.status_code == 200
        assert response.json()["status"] == "UP"  # not probed yet: no verdict


def wait_for_label_studio_verdict(client: TestClient) -> dict:
    deadline = time.monotonic() + 5
    body = client.get("/health").json()
    while "label_studio" not in body and time.monotonic() < deadline:
        time.sleep(0.02)
        body = client.get("/health").json()
    return body


def test_health_probes_label_studio_with_the_real_image_fetcher(model_class, tmp_path):
    with HttpHost(app=lambda request: Reply(200 if request.path == "/health" else 404, b"{}")) as stub:
        for url, status, verdict in (
            (stub.url, "UP", "reachable"),
            (closed_port_url(), "DEGRADED", "unreachable"),  # connections are refused
        ):
            settings = Settings(label_studio_url=url, image_cache_dir=tmp_path / "images")
            with TestClient(create_app(model_class, settings), raise_server_exceptions=False) as client:
                body = wait_for_label_studio_verdict(client)
                assert (body["status"], body["label_studio"]) == (status, verdict)


def test_setup_configures_images_and_returns_model_version(client, toy, label_studio):
    response = client.post("/setup", json=setup_body())
    assert response.status_code == 200, response.text
    assert response.json() == {"model_version": "toy-1"}
    assert label_studio.configured[-1] == {"hostname": "http://localhost:8080", "access_token": TOKEN}
    # Label Studio repeats /setup before every batch: the instance is kept, setup() runs once.
    assert client.post("/setup", json=setup_body()).status_code == 200
    assert toy.instances_created == 1
    instance = client.app.state.server.instances.get("1", None)
    assert instance.project_id == "1" and instance.label_config == LABEL_CONFIG


def test_setup_with_a_changed_config_recreates_the_instance(client, toy):
    client.post("/setup", json=setup_body())
    changed = LABEL_CONFIG.replace('background="#ff0000"', 'background="#00ff00"')
    assert client.post("/setup", json=setup_body(changed)).status_code == 200
    assert toy.instances_created == 2
    assert client.app.state.server.instances.get("1", None).label_config == changed


def test_setup_refuses_a_config_without_segmentation_output(client, toy):
    response = client.post("/setup", json=setup_body(TEXT_ONLY_CONFIG))
    assert response.status_code == 400
    assert "BrushLabels" in response.json()["error"]
    assert toy.instances_created == 0
    assert_healthy(client)


def test_state_set_in_one_instance_survives_a_config_change(client):
    client.post("/setup", json=setup_body())
    client.app.state.server.instances.get("1", None).model_version = "toy-7"
    changed = LABEL_CONFIG.replace('zoom="true"', 'zoom="false"')
    assert client.post("/setup", json=setup_body(changed)).json() == {"model_version": "toy-7"}


# -- predict ---------------------------------------------------------------------------------


def test_batch_predict_returns_one_result_per_task_in_order(client, toy):
    tasks = [ls_task(7), ls_task(3), ls_task(5)]
    response = client.post("/predict", json=predict_body(tasks))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["result"][0]["value"]["rle"][0] for r in results] == [7, 3, 5]
    assert all(r["model_version"] == "toy-1" for r in results)  # filled in by the server
    assert all(r["score"] == 0.5 for r in results)
    call = toy.predict_calls[-1]
    assert call["context"] is None
    assert call["kwargs"] == {"login": None, "password": None}


def test_params_that_would_collide_with_predicts_own_arguments_are_dropped(client, toy):
    body = predict_body([ls_task(1)])
    body["params"] |= {"self": 1, "tasks": [], "extra": "kept"}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    call = toy.predict_calls[-1]
    assert call["kwargs"] == {"login": None, "password": None, "extra": "kept"}
    assert [task["id"] for task in call["tasks"]] == [1]


def test_interactive_smart_rectangle_reaches_predict_as_context(client, toy):
    response = client.post("/predict", json=predict_body([ls_task(1)], context=SMART_RECTANGLE))
    assert response.status_code == 200, response.text
    region = response.json()["results"][0]["result"][0]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Nucleus"]
    assert toy.predict_calls[-1]["context"] == SMART_RECTANGLE


def test_interactive_keypoint_reaches_predict_as_context(client, toy):
    response = client.post("/predict", json=predict_body([ls_task(2)], context=KEYPOINT))
    assert response.status_code == 200, response.text
    context = toy.predict_calls[-1]["context"]
    assert context["result"][0]["is_positive"] is True
    assert context["result"][0]["value"]["keypointlabels"] == ["Nucleus"]


def test_predict_without_label_config_uses_the_one_from_setup(client, toy):
    client.post("/setup", json=setup_body())
    response = client.post("/predict", json=predict_body([ls_task(1)], label_config=None))
    assert response.status_code == 200, response.text
    assert toy.instances_created == 1
    assert client.app.state.server.instances.get("1", None).label_config == LABEL_CONFIG


def test_predict_with_an_unusable_config_is_a_400(client):
    response = client.post("/predict", json=predict_body([ls_task(1)], label_config=TEXT_ONLY_CONFIG))
    assert response.status_code == 400
    assert "BrushLabels" in response.json()["error"]


def test_predict_accepts_a_plain_list_and_none(label_studio):
    class ListModel(LabelStudioMLBase):
        MODEL_VERSION = "list-1"

        def validate_label_config(self) -> None:
            pass

        def predict(self, tasks, context=None, **kwargs):
            if tasks[0]["id"] == 0:
                return None
            return [{"result": [], "score": 0.1, "model_version": "explicit"}, {"result": []}]

    with make_client(ListModel, label_studio) as client:
        results = client.post("/predict", json=predict_body([ls_task(1), ls_task(2)])).json()["results"]
        assert [r["model_version"] for r in results] == ["explicit", "list-1"]
        assert client.post("/predict", json=predict_body([ls_task(0)])).json() == {"results": []}


def test_a_model_that_raises_gives_500_with_a_message_and_keeps_serving(client):
    response = client.post("/predict", json=predict_body([ls_task(1, image="/data/upload/1/explode.png")]))
    assert response.status_code == 500
    message = response.json()["error"]
    assert "internal error" in message and "RuntimeError" in message
    assert "exploded" not in message  # details stay in the log
    assert_healthy(client)
    assert client.post("/predict", json=predict_body([ls_task(2)])).status_code == 200


def test_a_backend_error_keeps_its_status_and_message(client):
    response = client.post("/predict", json=predict_body([ls_task(4, image="/data/upload/1/missing.png")]))
    assert response.status_code == 422
    assert response.json() == {"error": "image of task 4 not found: /data/upload/1/missing.png"}
    assert_healthy(client)


# -- webhook ---------------------------------------------------------------------------------


def test_start_training_is_answered_at_once_while_fit_runs_in_background(client, toy):
    toy.fit_gate.clear()  # fit blocks until released
    started = time.perf_counter()
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": ls_project()})
    elapsed = time.perf_counter() - started
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert elapsed < 1.0  # Label Studio's webhook timeout; fit is blocked for up to 10 s
    assert toy.fits == []  # still blocked in the background
    toy.fit_gate.set()
    assert toy.fit_done.wait(5)
    event, data = toy.fits[0]
    assert event == "START_TRAINING"
    assert data["project"]["id"] == 1 and "action" not in data


def test_annotation_created_reaches_fit_with_its_payload(client, toy):
    annotation = {"id": 11, "result": [], "task": 3, "completed_by": 1}
    payload = {
        "action": "ANNOTATION_CREATED",
        "annotation": annotation,
        "project": ls_project(),
        "task": ls_task(3),
    }
    assert client.post("/webhook", json=payload).json() == {"status": "ok"}
    assert toy.fit_done.wait(5)
    event, data = toy.fits[0]
    assert event == "ANNOTATION_CREATED"
    assert data["annotation"] == annotation and data["task"]["id"] == 3


def test_unknown_webhook_actions_are_ignored(client, toy):
    response = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": ls_project()})
    assert response.status_code == 200
    assert response.json()["status"] == "ignored"
    time.sleep(0.1)
    assert toy.fits == []


def test_a_failing_fit_is_logged_and_counted_and_the_server_keeps_serving(client, toy, caplog):
    before = metric_value(client.get("/metrics").text, "errors_total", endpoint="/webhook", kind="RuntimeError")
    with caplog.at_level(logging.ERROR, logger="backends.server.app"):
        response = client.post("/webhook", json={"action": "ANNOTATION_DELETED", "project": ls_project()})
        assert response.status_code == 200
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = client.get("/metrics").text
            if metric_value(text, "webhook_jobs_total", action="ANNOTATION_DELETED", outcome="error"):
                break
            time.sleep(0.02)
    assert metric_value(text, "errors_total", endpoint="/webhook", kind="RuntimeError") == before + 1
    assert any("ANNOTATION_DELETED" in record.getMessage() for record in caplog.records)
    assert_healthy(client)


def test_webhook_without_project_is_a_400(client):
    response = client.post("/webhook", json={"action": "START_TRAINING"})
    assert response.status_code == 400
    assert "project" in response.json()["error"]


# -- versions, metrics -------------------------------------------------------------------------


def test_versions(client):
    response = client.get("/versions")
    assert response.status_code == 200
    assert response.json() == {"versions": ["toy-1", "toy-0"]}


def test_metrics_count_requests_latencies_errors_and_model_metrics(client):
    text = client.get("/metrics").text
    predicted_before = metric_value(text, "requests_total", endpoint="/predict", status="200")
    client.post("/predict", json=predict_body([ls_task(1), ls_task(2)]))
    client.post("/predict", json=predict_body([ls_task(3)], context=SMART_RECTANGLE))
    client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric_value(text, "requests_total", endpoint="/predict", status="200") == predicted_before + 2
    assert metric_value(text, "requests_total", endpoint="/predict", status="400") == 1
    assert metric_value(text, "request_seconds_count", endpoint="/predict") == 3
    assert metric_value(text, "errors_total", endpoint="/predict", kind="invalid_json") == 1
    assert metric_value(text, "predicted_tasks_total", mode="batch") == 2
    assert metric_value(text, "predicted_tasks_total", mode="interactive") == 1
    assert metric_value(text, "toy_predictions_total") == 3


def test_two_apps_in_one_process_have_separate_metrics(model_class, label_studio):
    with (
        make_client(model_class, label_studio) as first,
        make_client(ToyModel, FakeLabelStudio()) as second,
    ):
        first.get("/versions")
        assert metric_value(first.get("/metrics").text, "requests_total", endpoint="/versions", status="200") == 1
        assert metric_value(second.get("/metrics").text, "requests_total", endpoint="/versions", status="200") == 0


# -- basic auth, body size ----------------------------------------------------------------------


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_when_configured(model_class, label_studio):
    with make_client(model_class, label_studio, basic_auth_user="ls", basic_auth_pass="s3cret") as client:
        for path in ("/health", "/versions", "/metrics"):
            response = client.get(path)
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Basic")
            assert "basic auth" in response.json()["error"]
        assert client.get("/health", headers=basic("ls", "wrong")).status_code == 401
        assert client.get("/health", headers=basic("other", "s3cret")).status_code == 401
        assert client.get("/health", headers={"Authorization": "Basic !!!"}).status_code == 401
        assert client.get("/health", headers={"Authorization": "Bearer s3cret"}).status_code == 401
        assert client.post("/setup", json=setup_body()).status_code == 401
        assert toy_of(client).instances_created == 0
        assert client.get("/health", headers=basic("ls", "s3cret")).status_code == 200
        assert client.post("/setup", json=setup_body(), headers=basic("ls", "s3cret")).status_code == 200


def test_no_auth_needed_when_not_configured(client):
    assert client.get("/versions").status_code == 200


def test_body_over_the_cap_is_a_413_by_header_and_by_stream(model_class, label_studio):
    with make_client(model_class, label_studio, max_request_mb=1 / 1024) as client:  # 1 KiB
        big = predict_body([ls_task(i) for i in range(20)])
        response = client.post("/predict", json=big)
        assert response.status_code == 413
        assert "MAX_REQUEST_MB" in response.json()["error"]

        def chunks():  # no Content-Length: sent chunked
            for _ in range(4):
                yield b" " * 600

        response = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert toy_of(client).predict_calls == []
        assert client.post("/predict", json=predict_body([ls_task(1)])).status_code == 413  # still > 1 KiB
        assert_healthy(client)


def test_interactive_context_of_several_megabytes_is_accepted_by_default(client):
    big_context = {"result": [SMART_RECTANGLE["result"][0]], "padding": "x" * (4 * 2**20)}
    response = client.post("/predict", json=predict_body([ls_task(1)], context=big_context))
    assert response.status_code == 200


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, status, fragment",
    [
        ("/predict", b'{"tasks": [', 400, "malformed JSON"),
        ("/predict", b"", 422, "body"),
        ("/predict", b"[]", 422, "body"),
        ("/predict", b'{"project": "1.2"}', 422, "tasks: Field required"),
        ("/predict", b'{"tasks": "abc"}', 422, "tasks"),
        ("/predict", b'{"tasks": [1, 2]}', 422, "tasks.0"),
        ("/predict", b'{"tasks": [], "params": {"context": [1]}}', 422, "params.context"),
        ("/setup", b'{"project": "1.2", "hostname": "http://x"}', 422, "schema: Field required"),
        ("/setup", b'{"schema": "<View/>"}', 422, "project"),
        ("/webhook", b'{"project": {"id": 1}}', 422, "action"),
        ("/webhook", b'{"action": 5}', 422, "action"),
        ("/predict", b'{"tasks": [{"id": 1, "data": {"image": "\\ud800.png"}}]}', 400, "tasks.0.data.image"),
        ("/webhook", b'{"action": "START_TRAINING", "project": {"id": 1, "t\\udc00": 2}}', 400, "surrogate"),
        ("/setup", b'{"project": "1/2", "schema": "<View/>"}', 400, "project must be"),
        ("/predict", b'{"tasks": [], "project": "1\\u0000.2"}', 400, "project must be"),
        ("/webhook", b'{"action": "START_TRAINING", "project": {"id": -1}}', 400, "project must be"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(client, path, body, status, fragment):
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]
    assert_healthy(client)


def test_validation_errors_do_not_echo_the_input(client):
    body = {"project": "1.2", "hostname": "http://x", "access_token": TOKEN, "schema": 12}
    response = client.post("/setup", json=body)
    assert response.status_code == 422
    assert TOKEN not in response.text and "12" not in response.json()["error"]


def test_openapi_schema_describes_the_protocol(client):
    schema = client.get("/openapi.json").json()
    for path in ("/health", "/setup", "/predict", "/webhook", "/versions", "/metrics"):
        assert path in schema["paths"]
    predict = schema["components"]["schemas"]["PredictRequest"]
    assert predict["required"] == ["tasks"] and predict["additionalProperties"] is True
    assert "schema" in schema["components"]["schemas"]["SetupRequest"]["properties"]
    error = schema["paths"]["/predict"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorResponse"}


def test_unknown_paths_and_methods_answer_with_an_error_field(client):
    response = client.get("/nope")
    assert response.status_code == 404 and "/nope" in response.json()["error"]
    response = client.get("/predict")
    assert response.status_code == 405 and "error" in response.json()


def test_logs_never_contain_tokens_or_bodies(client, caplog):
    with caplog.at_level(logging.DEBUG):
        client.post("/setup", json=setup_body())
        client.post("/setup", json={**setup_body(TEXT_ONLY_CONFIG)})
        client.post("/predict", json=predict_body([ls_task(1)], context=SMART_RECTANGLE))
        client.post("/predict", json=predict_body([ls_task(1, image="/data/upload/1/explode.png")]))
    logged = "\n".join(record.getMessage() + str(record.exc_info or "") for record in caplog.records)
    assert TOKEN not in logged
    assert "rectanglelabels" not in logged
    assert "POST /predict -> 500" in logged  # the request line itself is there


# -- the default label-config check and the real server ---------------------------------------


def test_a_model_without_overrides_validates_with_the_label_config_module(label_studio):
    class PlainModel(LabelStudioMLBase):
        def predict(self, tasks, context=None, **kwargs):
            return [{"result": []} for _ in tasks]

    with make_client(PlainModel, label_studio) as client:
        assert client.post("/setup", json=setup_body()).status_code == 200
        response = client.post("/setup", json=setup_body(TEXT_ONLY_CONFIG))
        assert response.status_code == 400 and response.json()["error"]
        response = client.post("/setup", json=setup_body("<View><Image name='i'"))
        assert response.status_code == 400 and response.json()["error"]
        assert_healthy(client)


def test_cli_parser_defaults():
    args = build_parser(LabelStudioMLBase, 7070).parse_args([])
    assert (args.host, args.port) == ("0.0.0.0", 7070)
    args = build_parser(LabelStudioMLBase, 7070).parse_args(["--host", "127.0.0.1", "--port", "9191"])
    assert (args.host, args.port) == ("127.0.0.1", 9191)


def test_cli_serves_the_model_with_settings_from_the_environment(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "LOG_LEVEL": "DEBUG",
        "BASIC_AUTH_USER": "ls",
        "BASIC_AUTH_PASS": "s3cret",
        "IMAGE_CACHE_DIR": str(tmp_path / "images"),
        "LABEL_STUDIO_URL": "",
    }
    code = (
        "from backends.server.cli import main; from tests.http.toy_model import ToyModel; "
        f"main(ToyModel, ['--host', '127.0.0.1', '--port', '{port}'])"
    )
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        auth = ("ls", "s3cret")
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", auth=auth, timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "the backend did not start"
                time.sleep(0.1)
        assert response.status_code == 200 and response.json()["status"] == "UP"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 401
        setup = httpx.post(f"http://127.0.0.1:{port}/setup", json=setup_body(), auth=auth, timeout=3)
        assert setup.json() == {"model_version": "toy-1"}
    finally:
        process.terminate()
        process.wait(10)
    logged = log_path.read_text()
    assert "POST /setup -> 200" in logged
    assert TOKEN not in logged and "s3cret" not in logged


@pytest.fixture
def live_app(model_class, label_studio):
    return create_app(model_class, Settings(), label_studio=label_studio)


@pytest.fixture
def live_server(live_app):
    """The app under a real uvicorn on a free loopback port; yields its base URL."""
    app = live_app
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_real_server_answers_health_and_webhooks_while_a_prediction_is_slow(live_server, live_app):
    toy = live_app.state.server.service
    toy.predict_gate = threading.Event()
    with httpx.Client(base_url=live_server, timeout=10) as http:
        slow = threading.Thread(target=lambda: http.post("/predict", json=predict_body([ls_task(1)])))
        slow.start()
        deadline = time.monotonic() + 5
        while not toy.predict_calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert toy.predict_calls, "the prediction never reached the model"
        started = time.perf_counter()
        assert http.get("/health", timeout=1).status_code == 200
        assert http.post("/webhook", json={"action": "START_TRAINING", "project": ls_project()}, timeout=1).json() == {
            "status": "ok"
        }
        assert time.perf_counter() - started < 1.0
        toy.predict_gate.set()
        slow.join(10)
        assert toy.fit_done.wait(5)
