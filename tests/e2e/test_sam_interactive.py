"""A smart rectangle drawn in Label Studio reaches the SAM backend and comes back as a brush mask."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from backends.masks.rle import decode_rle
from tests.e2e.dsb2018 import largest_inner_instances
from tests.support.masks import iou
from tests.support.payloads import SMART_ONLY_CONFIG, rectangle_around

pytestmark = pytest.mark.e2e

LABEL_CONFIG = SMART_ONLY_CONFIG
# A fluorescence image with well separated nuclei, and how many of them to prompt.
IMAGE_ID = "0121d6759c5adb290c8e828fc882f37dfaf3663ec885c663859948c154a443ed"
N_INSTANCES = 4


def test_smart_rectangle_returns_the_nucleus_mask(label_studio, start_backend, shared_data, tmp_path):
    image_path = shared_data / "dsb2018" / "images" / f"{IMAGE_ID}.png"
    labels = np.asarray(Image.open(shared_data / "dsb2018" / "labels" / f"{IMAGE_ID}.png"))
    instances = largest_inner_instances(labels, N_INSTANCES)
    assert len(instances) == N_INSTANCES

    ls = label_studio.ls
    project = ls.projects.create(title="sam interactive", label_config=LABEL_CONFIG)
    (task_id,) = label_studio.upload_files(project.id, [image_path])
    backend = start_backend("sam", env={"SAM_ENGINE": "classic"})
    ml = ls.ml.create(project=project.id, url=backend.url, title="SAM", is_interactive=True)

    ious = []
    for truth in instances:
        response = label_studio.http.post(
            f"{label_studio.url}/api/ml/{ml.id}/interactive-annotating",
            json={"task": task_id, "context": {"result": [rectangle_around(truth)]}},
            timeout=120,
        )
        assert response.status_code == 200, response.text[:500]
        body = response.json()
        assert "errors" not in body, body["errors"]
        results = body["data"]["result"]
        brushes = [region for region in results if region["type"] == "brushlabels"]
        assert len(brushes) == 1, [region["type"] for region in results]
        brush = brushes[0]
        assert brush["from_name"] == "tag" and brush["to_name"] == "image"
        assert brush["value"]["brushlabels"] == ["Nucleus"]
        assert (brush["original_height"], brush["original_width"]) == truth.shape
        mask = decode_rle(brush["value"]["rle"], brush["original_height"], brush["original_width"])
        ious.append(iou(mask, truth))
    print("IoU per nucleus:", [round(iou, 3) for iou in ious])
    assert min(ious) > 0.6, ious
    assert "classic" in backend.health()["engine"]
