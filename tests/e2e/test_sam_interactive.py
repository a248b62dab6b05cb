"""A smart rectangle drawn in Label Studio reaches the SAM backend and comes back as a brush mask."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from backends.masks.rle import decode_rle

pytestmark = pytest.mark.e2e

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Nucleus"/></BrushLabels>
  <RectangleLabels name="box" toName="image" smart="true" smartOnly="true"><Label value="Nucleus"/></RectangleLabels>
</View>"""
# A fluorescence image with well separated nuclei, and how many of them to prompt.
IMAGE_ID = "0121d6759c5adb290c8e828fc882f37dfaf3663ec885c663859948c154a443ed"
N_INSTANCES = 4


def _instances(labels: np.ndarray, count: int) -> list[np.ndarray]:
    """The `count` largest instance masks (HxW bool) that do not touch the image border."""
    candidates = []
    for value in np.unique(labels)[1:]:
        mask = labels == value
        rows, cols = np.nonzero(mask)
        if rows.min() == 0 or cols.min() == 0 or rows.max() == labels.shape[0] - 1 or cols.max() == labels.shape[1] - 1:
            continue
        candidates.append(mask)
    candidates.sort(key=lambda mask: -int(mask.sum()))
    return candidates[:count]


def _smart_rectangle(mask: np.ndarray) -> dict:
    """The tight bounding box of `mask` as Label Studio sends a smart rectangle (percent units)."""
    height, width = mask.shape
    rows, cols = np.nonzero(mask)
    x0, y0, x1, y1 = cols.min(), rows.min(), cols.max() + 1, rows.max() + 1
    return {
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "x": 100.0 * x0 / width,
            "y": 100.0 * y0 / height,
            "width": 100.0 * (x1 - x0) / width,
            "height": 100.0 * (y1 - y0) / height,
            "rotation": 0,
            "rectanglelabels": ["Nucleus"],
        },
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


def test_smart_rectangle_returns_the_nucleus_mask(label_studio, start_backend, shared_data, tmp_path):
    image_path = shared_data / "dsb2018" / "images" / f"{IMAGE_ID}.png"
    labels = np.asarray(Image.open(shared_data / "dsb2018" / "labels" / f"{IMAGE_ID}.png"))
    instances = _instances(labels, N_INSTANCES)
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
            json={"task": task_id, "context": {"result": [_smart_rectangle(truth)]}},
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
        ious.append(_iou(mask, truth))
    print("IoU per nucleus:", [round(iou, 3) for iou in ious])
    assert min(ious) > 0.6, ious
    assert "classic" in backend.health()["engine"]
