"""The SAM backend (classic engine) with the repository's label_config.xml, through HTTP, with the
context Label Studio 1.23's editor sends for it (tool result + labels result per prompt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from backends.masks.rle import decode_rle
from backends.server.app import create_app
from backends.settings import Settings
from sam.model import SamBackend
from tests.support import payloads
from tests.support.http_host import HttpHost
from tests.support.images import png
from tests.support.masks import iou

CONFIG = (Path(__file__).resolve().parents[2] / "label_config.xml").read_text()
W, H = 200, 120
CENTRE, RADIUS = (70, 60), 30


@pytest.fixture(scope="module")
def served():
    rows, cols = np.ogrid[:H, :W]
    truth = (cols - CENTRE[0]) ** 2 + (rows - CENTRE[1]) ** 2 <= RADIUS**2
    gray = np.where(truth, 200, 30).astype(np.uint8)
    with HttpHost({"/disc.png": png(np.repeat(gray[:, :, None], 3, axis=2))}) as host:
        yield host.url, truth


@pytest.fixture
def client(served, tmp_path):
    settings = Settings(
        image_allowed_hosts=(served[0].split("//")[1],), image_cache_dir=tmp_path / "images", sam_engine="classic"
    )
    with TestClient(create_app(SamBackend, settings), raise_server_exceptions=False) as test_client:
        yield test_client


def pair(kind: str, value: dict, label: str, region_id: str, **extra) -> list[dict]:
    base = {"original_width": W, "original_height": H, "image_rotation": 0, "id": region_id, "to_name": "image"}
    tool = {**base, "type": kind, "from_name": "box" if kind == "rectangle" else "point", "value": value, **extra}
    return [tool, {**base, "type": "labels", "from_name": "label", "value": {**value, "labels": [label]}, **extra}]


def answer(client, url: str, results: list[dict]) -> list[dict]:
    body = payloads.predict_body([payloads.task(1, f"{url}/disc.png")], {"result": results}, CONFIG)
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["result"]


def test_a_box_then_a_negative_click_inside_corrects_the_same_region(client, served):
    url, truth = served
    box = {"x": 38 / W * 100, "y": 28 / H * 100, "width": 65 / W * 100, "height": 65 / H * 100, "rotation": 0}
    tool, labels = answer(client, url, pair("rectangle", box, "Cell", "p1"))
    assert (tool["type"], tool["from_name"], labels["type"], labels["from_name"]) == ("brush", "tag", "labels", "label")
    assert tool["id"] == labels["id"] and labels["value"]["labels"] == ["Cell"]
    first = decode_rle(labels["value"]["rle"], H, W)
    assert iou(first, truth) > 0.85

    # Label Studio sends the click alone (the box was a smart prompt, deleted on accept)
    click = {"x": 89 / W * 100, "y": 60 / H * 100, "width": 0.5}
    tool2, labels2 = answer(client, url, pair("keypoint", click, "Cell", "k1", is_positive=False))
    assert tool2["id"] == labels2["id"] == tool["id"]  # the editor replaces the region in place
    second = decode_rle(labels2["value"]["rle"], H, W)
    assert second.sum() < 0.8 * first.sum() and not second[60, 89]

    # a negative click far from every answered region: no region, so Label Studio drops the click
    assert (
        answer(client, url, pair("keypoint", {"x": 95, "y": 10, "width": 0.5}, "Cell", "k2", is_positive=False)) == []
    )
