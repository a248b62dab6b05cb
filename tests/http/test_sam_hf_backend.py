"""SAM 2.1 and SAM 3 through the SAM backend's HTTP API (tiny random models saved locally, nothing
downloaded): masks equal the engine's own answer for the same prompt, an added click refines the
region from its previous logits, text prompts give one region per instance, SAM_TEXT_PROMPTS
pre-annotates every label, and SAM_OUTPUT picks the kind of region."""

from __future__ import annotations

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
from tests.support.payloads import LABEL_CONFIG, POLYGON_CONFIG, task

WIDTH, HEIGHT = 160, 120
BOX = (45.0, 35.0, 96.0, 86.0)  # XYXY pixels
TEXT_CONFIG = LABEL_CONFIG.replace(
    "</View>", '  <TextArea name="prompt" toName="image" smart="true" editable="true"/>\n</View>'
)


def disk_image() -> np.ndarray:
    rows, cols = np.ogrid[:HEIGHT, :WIDTH]
    disk = (cols - 70) ** 2 + (rows - 60) ** 2 <= 25**2
    gray = np.where(disk, 200, 30).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


@pytest.fixture(scope="module")
def image_host():
    with HttpHost({"/disk.png": png(disk_image())}) as host:
        yield host


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from sam.engines.hf_testing import save_random_sam2, save_random_sam3

    root = tmp_path_factory.mktemp("hf")
    return {"sam2": save_random_sam2(root / "sam2"), "sam3": save_random_sam3(root / "sam3")}


def client_for(engine: str, checkpoints, image_host, tmp_path, **settings) -> TestClient:
    fields = dict(
        sam_engine=engine,
        sam_checkpoint=str(checkpoints[engine]),
        device="cpu",
        image_allowed_hosts=(image_host.url.split("//")[1],),
        image_cache_dir=tmp_path / "cache",
        embedding_cache_mb=256,
    )
    fields.update(settings)
    return TestClient(create_app(SamBackend, Settings(**fields)), raise_server_exceptions=False)


def rectangle(box=BOX, label="Nucleus"):
    x0, y0, x1, y1 = box
    return payloads.rectangle(
        100 * x0 / WIDTH,
        100 * y0 / HEIGHT,
        100 * (x1 - x0) / WIDTH,
        100 * (y1 - y0) / HEIGHT,
        label,
        original=(WIDTH, HEIGHT),
    )


def keypoint(x, y, positive):
    return payloads.keypoint(100 * x / WIDTH, 100 * y / HEIGHT, positive, "Nucleus", original=(WIDTH, HEIGHT))


def predict(client, context, config=LABEL_CONFIG, url=None, task_id=1):
    body = payloads.predict_body([task(task_id, url)], context, config)
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["result"]


def brush_masks(result):
    return [
        decode_rle(r["value"]["rle"], r["original_height"], r["original_width"]) > 0
        for r in result
        if r["type"] == "brushlabels"
    ]


def engine_of(client):
    return client.app.state.server.service.store.engine


@pytest.mark.parametrize("engine", ["sam2", "sam3"])
def test_a_smart_rectangle_answers_the_engines_mask_for_that_box(engine, checkpoints, image_host, tmp_path):
    with client_for(engine, checkpoints, image_host, tmp_path) as client:
        [mask] = brush_masks(predict(client, {"result": [rectangle()]}, url=f"{image_host.url}/disk.png"))
        hf = engine_of(client)
        expected = hf.predict_with_logits(hf.embed(disk_image()), box=BOX).mask
        assert mask.shape == (HEIGHT, WIDTH)
        assert np.array_equal(mask, expected)


@pytest.mark.parametrize("engine", ["sam2", "sam3"])
def test_an_added_click_refines_the_region_from_its_previous_logits(engine, checkpoints, image_host, tmp_path):
    url = f"{image_host.url}/disk.png"
    with client_for(engine, checkpoints, image_host, tmp_path) as client:
        predict(client, {"result": [rectangle()]}, url=url)
        [refined] = brush_masks(predict(client, {"result": [rectangle(), keypoint(60, 50, False)]}, url=url))
        hf = engine_of(client)
        embedding = hf.embed(disk_image())
        first = hf.predict_with_logits(embedding, box=BOX)
        expected = hf.predict_with_logits(embedding, BOX, [[60, 50]], [0], mask_input=first.logits)
        from_scratch = hf.predict_with_logits(embedding, BOX, [[60, 50]], [0])
        assert np.array_equal(refined, expected.mask)
        assert not np.array_equal(refined, from_scratch.mask)  # the previous logits mattered
        assert client.get("/health").json()["embedding_cache"]["refinements"] == 1


def test_a_text_prompt_gives_one_region_per_instance_with_the_matching_label(checkpoints, image_host, tmp_path):
    url = f"{image_host.url}/disk.png"
    with client_for(
        "sam3", checkpoints, image_host, tmp_path, sam_text_threshold=0.0, sam_text_max_instances=5
    ) as client:
        text = {"type": "textarea", "value": {"text": ["cell"]}, "from_name": "prompt", "to_name": "image"}
        result = predict(client, {"result": [text]}, config=TEXT_CONFIG, url=url)
        hf = engine_of(client)
        instances = hf.segment_text(hf.embed(disk_image()), "cell", score_threshold=0.0, max_instances=5)
        assert len(instances) >= 1
        assert len(result) == len(instances)
        assert {r["value"]["brushlabels"][0] for r in result} == {"Cell"}
        for region, instance in zip(result, instances, strict=True):
            assert np.array_equal(decode_rle(region["value"]["rle"], HEIGHT, WIDTH) > 0, instance.mask)


def test_text_prompt_pre_annotation_finds_every_label_when_a_task_opens(checkpoints, image_host, tmp_path):
    url = f"{image_host.url}/disk.png"
    settings = dict(
        sam_text_prompts="labels",
        sam_text_threshold=0.0,
        sam_text_max_instances=3,
        sam_text_synonyms="Nucleus=nucleus|cell nucleus",
    )
    with client_for("sam3", checkpoints, image_host, tmp_path, **settings) as client:
        result = predict(client, None, url=url)
        hf = engine_of(client)
        embedding = hf.embed(disk_image())
        expected = {
            "Nucleus": sum(len(hf.segment_text(embedding, p, 0.0, 3)) for p in ("nucleus", "cell nucleus")),
            "Cell": len(hf.segment_text(embedding, "Cell", 0.0, 3)),
        }
        found = {label: sum(r["value"]["brushlabels"] == [label] for r in result) for label in expected}
        assert found == expected and sum(found.values()) > 0


def test_a_text_prompt_on_an_engine_without_a_concept_detector_is_a_clear_400(checkpoints, image_host, tmp_path):
    with client_for("sam2", checkpoints, image_host, tmp_path) as client:
        text = {"type": "textarea", "value": {"text": ["cell"]}, "from_name": "prompt", "to_name": "image"}
        body = payloads.predict_body([task(1, f"{image_host.url}/disk.png")], {"result": [text]}, TEXT_CONFIG)
        response = client.post("/predict", json=body)
        assert response.status_code == 400
        assert "no text prompts" in response.json()["error"]


@pytest.mark.parametrize(
    "mode, kinds",
    [("brush", {"brushlabels"}), ("polygon", {"polygonlabels"}), ("both", {"brushlabels", "polygonlabels"})],
)
def test_sam_output_chooses_the_kind_of_region(mode, kinds, image_host, tmp_path):
    settings = Settings(
        sam_engine="classic",
        sam_output=mode,
        image_cache_dir=tmp_path / "cache",
        image_allowed_hosts=(image_host.url.split("//")[1],),
    )
    with TestClient(create_app(SamBackend, settings), raise_server_exceptions=False) as client:
        result = predict(client, {"result": [rectangle()]}, config=POLYGON_CONFIG, url=f"{image_host.url}/disk.png")
        assert {r["type"] for r in result} == kinds
