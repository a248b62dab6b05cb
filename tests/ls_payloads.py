"""Label Studio 1.23-shaped request bodies, shared by the HTTP and reliability tests
(see ../shared/notes/label-studio-facts.md).

Region coordinates are PERCENT of original_width / original_height (x right, y down).
`encode` writes JSON the way a careless client could (NaN and Infinity allowed), so the servers'
handling of non-finite numbers is exercised too.
"""
from __future__ import annotations

import json
from typing import Any

PROJECT = "1.1762076800"

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image"><Label value="Nucleus"/><Label value="Cell"/></BrushLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Nucleus"/><Label value="Cell"/></RectangleLabels>
  <KeyPointLabels name="point" toName="image" smart="true"><Label value="Nucleus"/><Label value="Cell"/></KeyPointLabels>
</View>"""

POLYGON_CONFIG = LABEL_CONFIG.replace(
    "</View>", '  <PolygonLabels name="outline" toName="image"><Label value="Nucleus"/></PolygonLabels>\n</View>'
)

WEBHOOK_ACTIONS = (
    "TASKS_CREATED", "TASKS_DELETED", "ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED",
    "ANNOTATION_DELETED", "ANNOTATIONS_DELETED", "START_TRAINING", "PROJECT_UPDATED", "PROJECT_CREATED",
    "PROJECT_DELETED", "LABEL_LINK_CREATED", "REVIEW_CREATED",
)


def encode(body: Any) -> bytes:
    """JSON bytes; NaN / Infinity written as the bare tokens Python's json module accepts."""
    return json.dumps(body, allow_nan=True).encode("utf-8")


def task(task_id: Any, image: Any, **extra: Any) -> dict:
    return {
        "id": task_id,
        "data": {"image": image},
        "meta": {},
        "annotations": [],
        "predictions": [],
        "drafts": [],
        "project": 1,
        "inner_id": task_id,
        "is_labeled": False,
        "total_annotations": 0,
        "total_predictions": 0,
        **extra,
    }


def rectangle(x, y, width, height, label="Nucleus", original=(160, 120), **extra) -> dict:
    return {
        "original_width": original[0],
        "original_height": original[1],
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": width, "height": height, "rotation": 0, "rectanglelabels": [label]},
        "id": "rect1",
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
        **extra,
    }


def keypoint(x, y, positive=True, label="Nucleus", original=(160, 120)) -> dict:
    return {
        "original_width": original[0],
        "original_height": original[1],
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": [label]},
        "is_positive": positive,
        "id": "kp1",
        "from_name": "point",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }


def predict_body(tasks: list, context: Any = None, config: str = LABEL_CONFIG, **params: Any) -> dict:
    return {
        "tasks": tasks,
        "project": PROJECT,
        "label_config": config,
        "params": {"login": None, "password": None, "context": context, **params},
    }


def setup_body(config: str = LABEL_CONFIG, access_token: str = "", hostname: str = "http://localhost:8080",
               extra_params: Any = None) -> dict:
    return {"project": PROJECT, "schema": config, "hostname": hostname, "access_token": access_token,
            "extra_params": extra_params}
