"""The SAM backend through HTTP with Label Studio 1.23-shaped payloads.

Images come from a loopback HTTP server (allowed through IMAGE_ALLOWED_HOSTS) through the real
ImageFetcher. Engines: the classic one, a tiny randomly initialised SAM, and a deterministic
custom engine (SAM_ENGINE=module:Class) whose masks are known exactly.
"""
from __future__ import annotations

import http.server
import io
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backends.masks.rle import decode_rle
from backends.server.app import create_app
from backends.settings import Settings
from sam.model import SamBackend
from tests import ls_payloads as payloads
from tests.ls_payloads import task

WIDTH, HEIGHT = 160, 120
DISK_CENTRE, DISK_RADIUS = (70, 60), 25  # XY pixels

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image"><Label value="Nucleus"/><Label value="Cell"/></BrushLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Nucleus"/><Label value="Cell"/></RectangleLabels>
  <KeyPointLabels name="point" toName="image" smart="true"><Label value="Nucleus"/><Label value="Cell"/></KeyPointLabels>
</View>"""

POLYGON_CONFIG = LABEL_CONFIG.replace(
    "</View>", '  <PolygonLabels name="outline" toName="image"><Label value="Nucleus"/></PolygonLabels>\n</View>'
)


def disk_png() -> tuple[bytes, np.ndarray]:
    rows, cols = np.ogrid[:HEIGHT, :WIDTH]
    truth = (cols - DISK_CENTRE[0]) ** 2 + (rows - DISK_CENTRE[1]) ** 2 <= DISK_RADIUS**2
    noise = np.random.default_rng(0).normal(0, 6, (HEIGHT, WIDTH))
    gray = np.clip(np.where(truth, 200, 30) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2)).save(buffer, format="PNG")
    return buffer.getvalue(), truth


class BoxEngine:
    """Deterministic custom engine: the mask is the box, or 5x5 squares around positive points."""

    name = "box-engine"

    def embed(self, image):
        return np.zeros(image.shape[:2], np.uint8)

    def predict(self, embedding, box=None, points=None, point_labels=None):
        mask = np.zeros(embedding.shape, bool)
        if box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            mask[y0:y1, x0:x1] = True
        for (x, y), label in zip(points or [], point_labels or []):
            mask[max(0, int(y) - 2) : int(y) + 3, max(0, int(x) - 2) : int(x) + 3] = label == 1
        return mask, 0.5


@pytest.fixture(scope="module")
def image_server():
    """Serves /disk.png and /other.png (404 elsewhere); counts GETs per path."""
    png, truth = disk_png()
    hits: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?")[0]
            hits[path] = hits.get(path, 0) + 1
            if path not in ("/disk.png", "/other.png"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.truth, server.hits = truth, hits
    server.base = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from sam.engines.segment_anything_engine import save_random_checkpoint

    return save_random_checkpoint(tmp_path_factory.mktemp("sam") / "tiny.pth", "vit_tiny")


ENGINES = {
    "classic": dict(sam_engine="classic"),
    "sam": dict(sam_engine="auto", sam_model_type="vit_tiny", device="cpu"),  # checkpoint added below
    "custom": dict(sam_engine=f"{__name__}:BoxEngine"),
}


@pytest.fixture(params=list(ENGINES))
def backend(request, image_server, tiny_checkpoint, tmp_path):
    fields = dict(ENGINES[request.param])
    if request.param == "sam":
        fields["sam_checkpoint"] = str(tiny_checkpoint)
    settings = Settings(
        image_allowed_hosts=(image_server.base.split("//")[1],),
        image_cache_dir=tmp_path / "image-cache",
        embedding_cache_mb=64,
        **fields,
    )
    model_class = type(f"SamBackend_{request.param}", (SamBackend,), {})  # class state per app
    with TestClient(create_app(model_class, settings), raise_server_exceptions=False) as client:
        client.engine = request.param
        client.base = image_server.base
        yield client


def rectangle(x, y, width, height, label="Nucleus"):
    return payloads.rectangle(x, y, width, height, label, original=(WIDTH, HEIGHT))


def keypoint(x, y, positive=True, label="Nucleus"):
    return payloads.keypoint(x, y, positive, label, original=(WIDTH, HEIGHT))


def predict(client, tasks, context=None, config=LABEL_CONFIG):
    body = {
        "tasks": tasks,
        "project": "1.1762076800",
        "label_config": config,
        "params": {"login": None, "password": None, "context": context},
    }
    return client.post("/predict", json=body)


def health(client) -> dict:
    response = client.get("/health")
    assert response.status_code == 200
    return response.json()


def wait_for_entries(client, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while health(client)["embedding_cache"]["entries"] < count:
        assert time.monotonic() < deadline, f"embedding cache never reached {count} entries: {health(client)}"
        time.sleep(0.05)


def masks_of(result: list[dict]) -> list[np.ndarray]:
    return [decode_rle(r["value"]["rle"], r["original_height"], r["original_width"]) for r in result if r["type"] == "brushlabels"]


# Disk box (45..96, 35..86 px) in percent of 160x120.
DISK_BOX = rectangle(45 / 1.6, 35 / 1.2, 51 / 1.6, 51 / 1.2)


def test_setup_and_health_name_the_engine(backend):
    body = {"project": "1.1762076800", "schema": LABEL_CONFIG, "hostname": "http://localhost:8080", "access_token": "t", "extra_params": None}
    response = backend.post("/setup", json=body)
    assert response.status_code == 200
    version = response.json()["model_version"]
    expected = {"classic": "classic-boxfit", "sam": "sam-vit_tiny", "custom": "box-engine"}[backend.engine]
    assert version == expected
    report = health(backend)
    assert report["engine"] == expected and report["status"] in ("UP", "DEGRADED")
    assert backend.get("/versions").json()["versions"] == [expected]


def test_batch_without_context_prewarms_and_answers_at_once(backend):
    response = predict(backend, [task(1, f"{backend.base}/disk.png")])
    assert response.status_code == 200 and response.json()["results"] == []
    wait_for_entries(backend, 1)
    assert health(backend)["embedding_cache"]["bytes"] > 0


def test_smart_rectangle_gives_one_brush_region(backend, image_server):
    response = predict(backend, [task(2, f"{backend.base}/disk.png")], {"result": [DISK_BOX]})
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["results"]
    (region,) = prediction["result"]
    assert region["type"] == "brushlabels" and region["from_name"] == "tag" and region["to_name"] == "image"
    assert region["value"]["brushlabels"] == ["Nucleus"]
    assert (region["original_width"], region["original_height"]) == (WIDTH, HEIGHT)
    assert isinstance(region["score"], float) and prediction["model_version"]
    (mask,) = masks_of(prediction["result"])
    assert mask.shape == (HEIGHT, WIDTH)
    if backend.engine == "classic":
        truth = image_server.truth
        assert (mask & truth).sum() / (mask | truth).sum() > 0.85
    if backend.engine == "custom":
        assert mask[35:86, 45:96].all() and mask.sum() == 51 * 51


def test_keypoints_positive_and_negative(backend):
    context = {"result": [keypoint(70 / 1.6, 60 / 1.2), keypoint(5, 5, positive=False)]}
    response = predict(backend, [task(3, f"{backend.base}/disk.png")], context)
    assert response.status_code == 200, response.text
    (region,) = response.json()["results"][0]["result"]
    (mask,) = masks_of([region])
    if backend.engine == "classic":
        assert mask[60, 70] and not mask[5, 5]
    if backend.engine == "custom":
        assert mask.sum() == 25 and mask[60, 70]


def test_two_rectangles_two_regions_with_their_labels(backend):
    context = {"result": [DISK_BOX, rectangle(2, 2, 20, 20, label="Cell")]}
    response = predict(backend, [task(4, f"{backend.base}/disk.png")], context)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]["result"]
    assert [r["value"]["brushlabels"] for r in result] == [["Nucleus"], ["Cell"]]
    assert len({r["id"] for r in result}) == 2


def test_polygon_config_adds_polygon_regions(backend):
    response = predict(backend, [task(5, f"{backend.base}/disk.png")], {"result": [DISK_BOX]}, config=POLYGON_CONFIG)
    assert response.status_code == 200, response.text
    kinds = [r["type"] for r in response.json()["results"][0]["result"]]
    assert kinds[0] == "brushlabels"
    if backend.engine != "sam":  # random weights may give an empty mask, hence no polygon
        assert "polygonlabels" in kinds


def test_cached_embedding_is_keyed_by_identity_not_signature(backend, image_server):
    url = f"{backend.base}/other.png"
    before = image_server.hits.get("/other.png", 0)
    for signature in ("aaa", "bbb", "ccc"):
        response = predict(backend, [task(6, f"{url}?X-Goog-Signature={signature}")], {"result": [DISK_BOX]})
        assert response.status_code == 200, response.text
    assert image_server.hits.get("/other.png", 0) - before <= 1  # fetched at most once (disk cache may hold it)
    assert health(backend)["embedding_cache"]["entries"] == 1


def test_tasks_created_webhook_prewarms(backend):
    body = {
        "action": "TASKS_CREATED",
        "tasks": [task(7, f"{backend.base}/disk.png"), task(8, f"{backend.base}/other.png")],
        "project": {"id": 1, "title": "Nuclei", "label_config": LABEL_CONFIG},
    }
    response = backend.post("/webhook", json=body)
    assert response.status_code == 200 and response.json()["status"] == "ok"
    wait_for_entries(backend, 2)


@pytest.mark.parametrize(
    "context, status, message",
    [
        ({"result": [rectangle(10, 10, 0, 20)]}, 400, "area"),
        ({"result": [rectangle(10, 10, 20, 20, label="Mitochondrion")]}, 400, "Mitochondrion"),
        ({"result": [{**rectangle(10, 10, 20, 20), "image_rotation": 90}]}, 400, "rotat"),
        ({"result": [keypoint(150, 20)]}, 400, "outside"),
    ],
)
def test_bad_prompts_are_4xx_with_a_message_and_the_server_keeps_serving(backend, context, status, message):
    response = predict(backend, [task(9, f"{backend.base}/disk.png")], context)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert health(backend)["status"] in ("UP", "DEGRADED")
    ok = predict(backend, [task(9, f"{backend.base}/disk.png")], {"result": [DISK_BOX]})
    assert ok.status_code == 200


def test_missing_image_and_missing_data_key_are_4xx(backend):
    missing = predict(backend, [task(10, f"{backend.base}/missing.png")], {"result": [DISK_BOX]})
    assert missing.status_code == 422, missing.text
    assert "missing.png" in missing.json()["error"] or "404" in missing.json()["error"]
    no_key = predict(backend, [{"id": 11, "data": {"picture": "x"}}], {"result": [DISK_BOX]})
    assert no_key.status_code == 400 and "data.image" in no_key.json()["error"]
    assert health(backend)["status"] in ("UP", "DEGRADED")
