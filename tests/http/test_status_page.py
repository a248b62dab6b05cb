"""The status page (`GET /` in a browser) and its JSON (`GET /status.json`) on both backends.

Through HTTP with the real apps (SAM with an exact test engine, the segmentation backend without
a model): the page renders, basic auth guards it, hostile values from requests are escaped,
secrets never appear, the JSON has the shape the page's script reads. The pure parts (rendering,
the training history, the error ring buffer) are checked on their own with hostile values in
every field. The live plot during a real training run is in tests/browser/test_status_page.py.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from backends.server.app import create_app
from backends.server.recent_errors import RecentErrors
from backends.server.status_page import limits_in_force, render_status_page
from backends.settings import Settings
from sam.model import SamBackend
from segmentation.model import SegmentationBackend
from segmentation.service import TrainingHistory
from tests.support import payloads
from tests.support.engines import BOX_ENGINE
from tests.support.http_host import PNG, HttpHost, Reply, closed_port_url
from tests.support.images import png, quadrant_rgb

USER, PASSWORD = "admin", "pa55-Word-never-shown"
API_KEY = "ls-api-key-0123456789abcdef0123456789"
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}  # as a browser sends
HOSTILE = '<script>alert("owned")</script>'
SECRET_IN_URL = "leakedtoken9f8e7d6c5b4a39f8e7d6c5b4a3"


@pytest.fixture(scope="module")
def image_host():
    with HttpHost({"/quadrants.png": Reply(200, png(quadrant_rgb(40, 60)), PNG)}) as host:
        yield host


def make_client(model_class, tmp_path, **fields) -> TestClient:
    settings = dataclasses.replace(
        Settings(),
        basic_auth_user=USER,
        basic_auth_pass=PASSWORD,
        label_studio_url=closed_port_url(),  # nobody answers: the probe's failure is a logged warning
        label_studio_api_key=API_KEY,
        model_dir=tmp_path / "models",
        image_cache_dir=tmp_path / "image-cache",
        device="cpu",
        **fields,
    )
    client = TestClient(create_app(model_class, settings), raise_server_exceptions=False)
    client.auth = (USER, PASSWORD)
    return client


@pytest.fixture
def sam(tmp_path, image_host):
    with make_client(
        SamBackend, tmp_path, sam_engine=BOX_ENGINE, image_allowed_hosts=(image_host.url.split("//")[1],)
    ) as client:
        yield client


@pytest.fixture
def segmentation(tmp_path):
    with make_client(SegmentationBackend, tmp_path, train_minutes=0.5) as client:
        yield client


@pytest.fixture(params=["sam", "segmentation"])
def backend(request):
    return request.getfixturevalue(request.param)


def page(client) -> str:
    response = client.get("/", headers=HTML)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"].startswith("text/html")
    return response.text


# -- the page over HTTP --------------------------------------------------------------------------


def test_the_page_shows_engine_training_caches_errors_and_limits(backend):
    text = page(backend)
    for heading in ("Service", "Training", "Model versions", "Caches", "Recent errors", "Limits in force"):
        assert f"<h2>{heading}</h2>" in text
    assert "MAX_REQUEST_MB" in text and "IMAGE_MAX_MEGAPIXELS" in text
    assert 'src="static/uPlot.iife.min.js"' in text and 'src="static/status.js"' in text
    assert "https://" not in text.replace("https://github.com", "")  # no CDN: the page works offline
    if backend.app.state.server.model_class is SamBackend:
        assert "box-engine" in text and "This backend does not train." in text
        assert "EMBEDDING_CACHE_MB" in text and "TRAIN_MINUTES" not in text
    else:
        assert "No model version yet." in text and "<b>device</b> cpu" in text
        assert "TRAIN_MINUTES" in text and "EMBEDDING_CACHE_MB" not in text


def test_root_without_html_in_accept_still_answers_health_json(backend):
    response = backend.get("/", headers={"Accept": "application/json"})
    assert response.status_code == 200 and response.json()["status"] in ("UP", "DEGRADED")
    assert response.json() == {**backend.get("/health").json(), "status": response.json()["status"]}


@pytest.mark.parametrize("path", ["/", "/status.json", "/static/status.js", "/static/uPlot.iife.min.js"])
def test_basic_auth_guards_the_page_its_json_and_its_files(sam, path):
    wrong = "Basic " + base64.b64encode(f"{USER}:wrong".encode()).decode()
    for headers in ({}, {"Authorization": wrong}):
        response = sam.get(path, headers={**HTML, **headers}, auth=None)
        assert response.status_code == 401, (path, response.status_code)
        assert PASSWORD not in response.text
    assert sam.get(path, headers=HTML).status_code == 200


def test_static_files_are_an_allow_list_with_the_plot_library_license(sam):
    script = sam.get("/static/uPlot.iife.min.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.text.startswith("/*! https://github.com/leeoniya/uPlot (v1.6.32) */")
    assert "MIT License" in sam.get("/static/uPlot.LICENSE").text and "uPlot" in sam.get("/static/NOTICE").text
    for name in ("..%2Fstatus_page.py", "%2E%2E%2Fapp.py", "nothing.js", "status.py", "__init__.py"):
        response = sam.get(f"/static/{name}")
        assert response.status_code == 404, name


def test_hostile_values_from_requests_are_escaped_and_secrets_never_shown(sam, image_host):
    """A prompt whose label is a <script> carrying a token: the answer is a 400 naming the label,
    the warning logged for it is on the page escaped and redacted, and no configured secret shows."""
    label = f"{HOSTILE} access_token={SECRET_IN_URL}"
    context = {"result": [payloads.rectangle(10, 10, 20, 20, label=label, original=(60, 40))]}
    task = payloads.task(1, f"{image_host.url}/quadrants.png")
    response = sam.post("/predict", json=payloads.predict_body([task], context))
    assert response.status_code == 400 and HOSTILE in response.json()["error"], response.text
    text = page(sam)
    errors = sam.get("/status.json").json()["errors"]
    assert any(HOSTILE in error["message"] for error in errors), errors  # JSON: the text as it was
    assert text.count("<script") == 2  # the page's own two, nothing injected
    assert "label &#x27;&lt;script&gt;alert(&quot;owned&quot;)&lt;/script&gt; access_token=[REDACTED]" in text
    for shown in (text, str(errors), sam.get("/health").text):
        for secret in (PASSWORD, API_KEY, SECRET_IN_URL):
            assert secret not in shown


def test_status_json_has_what_the_page_script_reads(sam, segmentation, image_host):
    # SAM: one interactive prompt twice on one image -> the embedding cache has a miss, then a hit.
    context = {"result": [payloads.rectangle(10, 10, 20, 20, original=(60, 40))]}
    body = payloads.predict_body([payloads.task(1, f"{image_host.url}/quadrants.png")], context)
    for _ in range(2):
        assert sam.post("/predict", json=body).status_code == 200
    report = sam.get("/status.json").json()
    assert set(report) == {"backend", "status", "generated", "health", "training", "caches", "errors"}
    assert report["backend"] == "SamBackend" and report["training"] is None
    assert report["health"]["engine"] == "box-engine"
    caches = {cache["name"]: cache for cache in report["caches"]}
    assert caches["embeddings"]["hits"] == 1 and caches["embeddings"]["misses"] == 1
    assert caches["embeddings"]["hit_rate"] == 0.5 and caches["embeddings"]["bytes"] > 0
    assert caches["images (disk)"]["entries"] == 1
    for error in report["errors"]:
        assert set(error) == {"time", "level", "logger", "message"}

    # Segmentation: a project appears with its training fields and an (empty) history.
    assert segmentation.post("/setup", json=payloads.setup_body(payloads.BRUSH_CONFIG)).status_code == 200
    report = segmentation.get("/status.json").json()
    assert report["backend"] == "SegmentationBackend"
    assert report["training"]["1"]["state"] == "idle"
    assert report["training"]["1"]["history"] == {"loss": [], "val_dice": []}
    assert "projects" not in report["health"]


def test_the_error_handler_goes_with_the_server(tmp_path):
    root = logging.getLogger()
    with make_client(SamBackend, tmp_path, sam_engine=BOX_ENGINE) as client:
        handler = client.app.state.server.recent_errors
        assert handler in root.handlers
    assert handler not in root.handlers  # shutdown took it off


# -- the pure parts ----------------------------------------------------------------------------


def hostile_report() -> dict:
    return {
        "backend": "SegmentationBackend",
        "status": HOSTILE,
        "generated": 1_790_000_000.0,
        "health": {"engine": HOSTILE, "device": HOSTILE, "nested": {HOSTILE: HOSTILE}},
        "training": {
            HOSTILE: {
                "state": HOSTILE,
                "val_dice": {HOSTILE: 0.5},
                "problems": [HOSTILE],
                "error": HOSTILE,
                "history": {"loss": [[1, 0.5, 0.1]], "val_dice": []},
            }
        },
        "caches": [{"name": HOSTILE, "bytes": 1, "capacity_bytes": 2, "hits": 1, "misses": 1, "hit_rate": 0.5}],
        "errors": [{"time": 1_790_000_000.0, "level": HOSTILE, "logger": HOSTILE, "message": HOSTILE}],
    }


def test_rendering_escapes_every_value():
    versions = [
        {"version": HOSTILE, "project": HOSTILE, "created": HOSTILE, "current": True},
        {"version": "v2", "project": "1", "created": "2026", "val_dice": {HOSTILE: 0.9}, "val_iou": {HOSTILE: 0.8}},
    ]
    limits = [(HOSTILE, HOSTILE, HOSTILE, HOSTILE)]
    parsed = ParsedPage()
    parsed.feed(render_status_page(hostile_report(), versions, limits, HOSTILE))
    assert parsed.scripts == ["static/uPlot.iife.min.js", "static/status.js"]  # nothing injected
    assert not parsed.handlers, parsed.handlers
    assert sum(HOSTILE in text for text in parsed.texts) >= 15  # each value shown as text, as it was


class ParsedPage(HTMLParser):
    """The page as a browser parses it: script sources, on* attributes, text pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str | None] = []
        self.handlers: list[str] = []
        self.texts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs).get("src"))
        self.handlers += [name for name, _ in attrs if name.startswith("on")]

    def handle_data(self, data: str) -> None:
        self.texts.append(data)


def test_limits_shown_are_the_backends_own():
    settings = dataclasses.replace(Settings(), train_minutes=2.5, max_request_mb=8)
    names = {
        package: {name: value for _, name, value, _ in limits_in_force(settings, package)}
        for package in ("sam", "segmentation", "tests")
    }
    assert names["segmentation"]["TRAIN_MINUTES"] == 2.5 and "EMBEDDING_CACHE_MB" not in names["segmentation"]
    assert names["sam"]["MAX_REQUEST_MB"] == 8 and "TRAIN_MINUTES" not in names["sam"]
    assert {"TRAIN_MINUTES", "EMBEDDING_CACHE_MB"} <= set(names["tests"])  # a model of its own: every group


def test_training_history_stays_bounded_covers_the_run_and_restarts_with_a_new_run():
    history = TrainingHistory(capacity=10)
    for step in range(1, 101):
        history.add(step, loss=1.0 / step, elapsed_s=step / 10)
        if step % 20 == 0:
            history.add(step, loss=1.0 / step, elapsed_s=step / 10, val_dice=step / 100)
    report = history.report()
    steps = [point[0] for point in report["loss"]]
    assert len(steps) <= 10 and steps[0] == 1 and steps[-1] == 100 and steps == sorted(steps)
    assert [point[:2] for point in report["val_dice"]] == [[20, 0.2], [40, 0.4], [60, 0.6], [80, 0.8], [100, 1.0]]
    history.add(1, loss=0.9, elapsed_s=0.1)  # step 1 again: a new run
    assert history.report() == {"loss": [[1, 0.9, 0.1]], "val_dice": []}


def test_recent_errors_keep_the_newest_few_redacted():
    handler = RecentErrors(capacity=3)
    logger = logging.getLogger("tests.status_page.recent")
    logger.addHandler(handler)
    try:
        for index in range(5):
            logger.warning("failure %d with Authorization: Token %s", index, "abcdef0123456789")
        try:
            raise RuntimeError(f"boom at http://user:{PASSWORD}@host/x")
        except RuntimeError:
            logger.exception("a job failed")
        logger.info("not an error")
    finally:
        logger.removeHandler(handler)
    entries = handler.entries()
    assert [entry["message"][:12] for entry in entries] == ["a job failed", "failure 4 wi", "failure 3 wi"]
    assert "RuntimeError: boom" in entries[0]["message"] and PASSWORD not in entries[0]["message"]
    assert all("abcdef0123456789" not in entry["message"] for entry in entries)
