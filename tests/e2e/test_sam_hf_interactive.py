"""SAM 2.1 and SAM 3 (tiny random models saved locally) through a real Label Studio's labeling API:
a smart rectangle returns the engine's mask for that box, and a smart TextArea's text prompt returns
one region per instance the engine finds."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from backends.images.decode import decode_image
from backends.masks.coords import percent_box_to_pixels
from backends.masks.rle import decode_rle
from tests.e2e.dsb2018 import largest_inner_instances
from tests.support.payloads import SMART_ONLY_CONFIG, rectangle_around

pytestmark = pytest.mark.e2e

IMAGE_ID = "0121d6759c5adb290c8e828fc882f37dfaf3663ec885c663859948c154a443ed"
TEXT_CONFIG = SMART_ONLY_CONFIG.replace(
    "</View>", '  <TextArea name="prompt" toName="image" smart="true" editable="true"/>\n</View>'
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from sam.engines.hf_testing import save_random_sam2, save_random_sam3

    root = tmp_path_factory.mktemp("hf-e2e")
    return {"sam2": save_random_sam2(root / "sam2"), "sam3": save_random_sam3(root / "sam3")}


def interactive(label_studio, ml_id: int, task_id: int, regions: list[dict]) -> list[dict]:
    response = label_studio.http.post(
        f"{label_studio.url}/api/ml/{ml_id}/interactive-annotating",
        json={"task": task_id, "context": {"result": regions}},
        timeout=120,
    )
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert "errors" not in body, body["errors"]
    return body["data"]["result"]


def project_with_backend(label_studio, start_backend, image_path, config, env):
    ls = label_studio.ls
    project = ls.projects.create(title=f"sam {env['SAM_ENGINE']}", label_config=config)
    (task_id,) = label_studio.upload_files(project.id, [image_path])
    backend = start_backend("sam", env={"HF_HUB_OFFLINE": "1", "DEVICE": "cpu", **env})
    ml = ls.ml.create(project=project.id, url=backend.url, title="SAM", is_interactive=True)
    return backend, ml.id, task_id


@pytest.mark.parametrize("engine", ["sam2", "sam3"])
def test_a_smart_rectangle_returns_the_engines_mask(engine, checkpoints, label_studio, start_backend, shared_data):
    image_path = shared_data / "dsb2018" / "images" / f"{IMAGE_ID}.png"
    truth = largest_inner_instances(np.asarray(Image.open(shared_data / "dsb2018" / "labels" / f"{IMAGE_ID}.png")), 1)[
        0
    ]
    backend, ml_id, task_id = project_with_backend(
        label_studio,
        start_backend,
        image_path,
        SMART_ONLY_CONFIG,
        {"SAM_ENGINE": engine, "SAM_CHECKPOINT": str(checkpoints[engine])},
    )
    region = rectangle_around(truth)
    [brush] = [r for r in interactive(label_studio, ml_id, task_id, [region]) if r["type"] == "brushlabels"]
    assert brush["value"]["brushlabels"] == ["Nucleus"]
    mask = decode_rle(brush["value"]["rle"], brush["original_height"], brush["original_width"]) > 0

    from backends.settings import Settings
    from sam.engines import load_engine

    hf = load_engine(Settings(sam_engine=engine, sam_checkpoint=str(checkpoints[engine]), device="cpu"))
    pixels = decode_image(image_path.read_bytes(), 120_000_000)
    box = percent_box_to_pixels(region["value"], pixels.shape[1], pixels.shape[0])
    assert np.array_equal(mask, hf.predict_with_logits(hf.embed(pixels), box=box).mask)
    assert engine in backend.health()["engine"]


def test_a_text_prompt_returns_one_region_per_instance(checkpoints, label_studio, start_backend, shared_data):
    image_path = shared_data / "dsb2018" / "images" / f"{IMAGE_ID}.png"
    backend, ml_id, task_id = project_with_backend(
        label_studio,
        start_backend,
        image_path,
        TEXT_CONFIG,
        {
            "SAM_ENGINE": "sam3",
            "SAM_CHECKPOINT": str(checkpoints["sam3"]),
            "SAM_TEXT_THRESHOLD": "0",
            "SAM_TEXT_MAX_INSTANCES": "3",
        },
    )
    text = {
        "type": "textarea",
        "value": {"text": ["nucleus"]},
        "from_name": "prompt",
        "to_name": "image",
        "origin": "manual",
    }
    result = interactive(label_studio, ml_id, task_id, [text])

    from backends.settings import Settings
    from sam.engines import load_engine

    hf = load_engine(Settings(sam_engine="sam3", sam_checkpoint=str(checkpoints["sam3"]), device="cpu"))
    pixels = decode_image(image_path.read_bytes(), 120_000_000)
    instances = hf.segment_text(hf.embed(pixels), "nucleus", score_threshold=0.0, max_instances=3)
    assert len(instances) >= 1
    assert len(result) == len(instances)
    assert all(r["type"] == "brushlabels" and r["value"]["brushlabels"] == ["Nucleus"] for r in result)
