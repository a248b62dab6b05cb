"""The SAM backend through HTTP with Label Studio 1.23-shaped payloads.

Images come from a loopback HTTP server (allowed through IMAGE_ALLOWED_HOSTS) through the real
ImageFetcher. Engines: the classic one, a tiny randomly initialised SAM, and a deterministic
custom engine (SAM_ENGINE=module:Class) whose masks are known exactly.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from backends.masks.rle import decode_rle
from backends.server.app import create_app
from backends.settings import Settings
from sam.model import SamBackend
from tests.support import payloads
from tests.support.engines import BOX_ENGINE
from tests.support.http_host import HttpHost
from tests.support.images import png
from tests.support.payloads import LABEL_CONFIG, POLYGON_CONFIG, task

WIDTH, HEIGHT = 160, 120
DISK_CENTRE, DISK_RADIUS = (70, 60), 25  # XY pixels


def disk_png() -> tuple[bytes, np.ndarray]:
    rows, cols = np.ogrid[:HEIGHT, :WIDTH]
    truth = (cols - DISK_CENTRE[0]) ** 2 + (rows - DISK_CENTRE[1]) ** 2 <= DISK_RADIUS**2
    noise = np.random.default_rng(0).normal(0, 6, (HEIGHT, WIDTH))
    gray = np.clip(np.where(truth, 200, 30) + noise, 0, 255).astype(np.uint8)
    return png(np.repeat(gray[:, :, None], 3, axis=2)), truth


@pytest.fixture(scope="module")
def image_server():
    """Serves /disk.png and /other.png (404 elsewhere): `base` URL, the disk's `truth`, `hits(path)`."""
    disk, truth = disk_png()
    with HttpHost({"/disk.png": disk, "/other.png": disk}) as host:
        yield SimpleNamespace(base=host.url, truth=truth, hits=host.hits)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from sam.engines.segment_anything_engine import save_random_checkpoint

    return save_random_checkpoint(tmp_path_factory.mktemp("sam") / "tiny.pth", "vit_tiny")


ENGINES = {
    "classic": dict(sam_engine="classic"),
    "sam": dict(sam_engine="auto", sam_model_type="vit_tiny", device="cpu"),  # checkpoint added below
    "custom": dict(sam_engine=BOX_ENGINE),
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
    with TestClient(create_app(SamBackend, settings), raise_server_exceptions=False) as client:
        client.engine = request.param
        client.base = image_server.base
        yield client


def rectangle(x, y, width, height, label="Nucleus"):
    return payloads.rectangle(x, y, width, height, label, original=(WIDTH, HEIGHT))


def keypoint(x, y, positive=True, label="Nucleus"):
    return payloads.keypoint(x, y, positive, label, original=(WIDTH, HEIGHT))


def predict(client, tasks, context=None, config=LABEL_CONFIG):
    return client.post("/predict", json=payloads.predict_body(tasks, context, config))


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
    return [
        decode_rle(r["value"]["rle"], r["original_height"], r["original_width"])
        for r in result
        if r["type"] == "brushlabels"
    ]


# Disk box (45..96, 35..86 px) in percent of 160x120.
DISK_BOX = rectangle(45 / 1.6, 35 / 1.2, 51 / 1.6, 51 / 1.2)


def test_setup_and_health_name_the_engine(backend):
    response = backend.post("/setup", json=payloads.setup_body(access_token="t"))
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


def test_a_config_with_brush_and_polygon_tags_gets_one_kind_of_region_per_prompt(backend):
    """SAM_OUTPUT=auto: the brush region only (two kinds per prompt doubled every object in the UI)."""
    response = predict(backend, [task(5, f"{backend.base}/disk.png")], {"result": [DISK_BOX]}, config=POLYGON_CONFIG)
    assert response.status_code == 200, response.text
    kinds = [r["type"] for r in response.json()["results"][0]["result"]]
    assert kinds == ["brushlabels"]


def test_cached_embedding_is_keyed_by_identity_not_signature(backend, image_server):
    url = f"{backend.base}/other.png"
    before = image_server.hits("/other.png")
    for signature in ("aaa", "bbb", "ccc"):
        response = predict(backend, [task(6, f"{url}?X-Goog-Signature={signature}")], {"result": [DISK_BOX]})
        assert response.status_code == 200, response.text
    assert image_server.hits("/other.png") - before <= 1  # fetched at most once (disk cache may hold it)
    assert health(backend)["embedding_cache"]["entries"] == 1


def test_tasks_created_webhook_prewarms(backend):
    body = {
        "action": "TASKS_CREATED",
        "tasks": [task(7, f"{backend.base}/disk.png"), task(8, f"{backend.base}/other.png")],
        "project": payloads.project(),
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
