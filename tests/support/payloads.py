"""Label Studio 1.23-shaped bodies: tasks, annotations, regions, /setup, /predict and webhooks
(see ../shared/notes/label-studio-facts.md).

Region coordinates are PERCENT of original_width / original_height (x right, y down);
`rectangle_around` turns an (H, W) bool mask's pixel bounding box into them. `encode` writes JSON
the way a careless client could (NaN and Infinity allowed), so the servers' handling of
non-finite numbers is exercised too.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

PROJECT = "1.1762076800"
UPDATED_AT = "2026-11-02T10:00:00Z"

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image"><Label value="Nucleus"/><Label value="Cell"/></BrushLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Nucleus"/><Label value="Cell"/></RectangleLabels>
  <KeyPointLabels name="point" toName="image" smart="true"><Label value="Nucleus"/><Label value="Cell"/></KeyPointLabels>
</View>"""

POLYGON_CONFIG = LABEL_CONFIG.replace(
    "</View>", '  <PolygonLabels name="outline" toName="image"><Label value="Nucleus"/></PolygonLabels>\n</View>'
)

# One brush tag, Nucleus only: all the segmentation backend needs (and a Label Studio project's).
BRUSH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Nucleus"/></BrushLabels>
</View>"""

# BRUSH_CONFIG plus a smart rectangle that only prompts the ML backend (SAM in Label Studio).
SMART_ONLY_CONFIG = BRUSH_CONFIG.replace(
    "</View>",
    (
        '  <RectangleLabels name="box" toName="image" smart="true" smartOnly="true"><Label value="Nucleus"/>'
        "</RectangleLabels>\n</View>"
    ),
)

WEBHOOK_ACTIONS = (
    "TASKS_CREATED",
    "TASKS_DELETED",
    "ANNOTATION_CREATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATION_DELETED",
    "ANNOTATIONS_DELETED",
    "START_TRAINING",
    "PROJECT_UPDATED",
    "PROJECT_CREATED",
    "PROJECT_DELETED",
    "LABEL_LINK_CREATED",
    "REVIEW_CREATED",
)


def encode(body: Any) -> bytes:
    """JSON bytes; NaN / Infinity written as the bare tokens Python's json module accepts."""
    return json.dumps(body, allow_nan=True).encode("utf-8")


# ----------------------------------------------------------------------------- tasks and annotations


def task(task_id: Any, image: Any = "/data/upload/1/cells.png", **extra: Any) -> dict:
    """A task as Label Studio serialises it for an ML backend (`extra` adds or replaces fields,
    e.g. annotations=[...] for a project export)."""
    return {
        "id": task_id,
        "data": {"image": image},
        "meta": {},
        "created_at": "2026-11-02T10:00:00.000000Z",
        "updated_at": "2026-11-02T10:00:00.000000Z",
        "is_labeled": False,
        "overlap": 1,
        "inner_id": task_id,
        "total_annotations": 0,
        "cancelled_annotations": 0,
        "total_predictions": 0,
        "comment_count": 0,
        "unresolved_comment_count": 0,
        "last_comment_updated_at": None,
        "project": 1,
        "updated_by": None,
        "file_upload": 1,
        "comment_authors": [],
        "annotations": [],
        "predictions": [],
        "drafts": [],
        **extra,
    }


def annotation(annotation_id: int, result: list, updated_at: str = UPDATED_AT, cancelled: bool = False) -> dict:
    return {
        "id": annotation_id,
        "result": result,
        "was_cancelled": cancelled,
        "ground_truth": False,
        "created_at": updated_at,
        "updated_at": updated_at,
        "lead_time": 3.2,
        "completed_by": 1,
    }


def project(config: str = LABEL_CONFIG, project_id: int = 1) -> dict:
    """The project object Label Studio puts in webhook payloads (abridged)."""
    return {"id": project_id, "title": "Nuclei", "label_config": config, "created_at": UPDATED_AT}


# ----------------------------------------------------------------------------- regions


def rectangle(x, y, width, height, label="Nucleus", original=(160, 120), rotation=0, **extra) -> dict:
    """A smart rectangle: x, y, width, height in percent of original = (width, height) in pixels."""
    return {
        "original_width": original[0],
        "original_height": original[1],
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": width, "height": height, "rotation": rotation, "rectanglelabels": [label]},
        "id": "rect1",
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
        **extra,
    }


def rectangle_around(mask: np.ndarray, label: str = "Nucleus", **extra) -> dict:
    """The tight bounding box of (H, W) bool `mask` as a smart rectangle."""
    height, width = mask.shape
    rows, cols = np.nonzero(mask)
    x0, y0, x1, y1 = cols.min(), rows.min(), cols.max() + 1, rows.max() + 1
    return rectangle(
        100.0 * x0 / width,
        100.0 * y0 / height,
        100.0 * (x1 - x0) / width,
        100.0 * (y1 - y0) / height,
        label,
        (width, height),
        **extra,
    )


def with_shared_labels(region: dict, labels_tag: str = "label") -> list[dict]:
    """A `rectanglelabels` / `keypointlabels` region as Label Studio 1.23's editor sends it when the
    tool takes its labels from a shared `<Labels>` tag (label_config.xml): the tool's result without
    labels, then a `labels` result with the same id."""
    kind = region["type"].removesuffix("labels")
    value = {key: item for key, item in region["value"].items() if key != f"{kind}labels"}
    tool = {**region, "type": kind, "value": value}
    twin = {
        **region,
        "type": "labels",
        "from_name": labels_tag,
        "value": {**value, "labels": region["value"][f"{kind}labels"]},
    }
    return [tool, twin]


def keypoint(x, y, positive=True, label="Nucleus", original=(160, 120), width=0.6, **extra) -> dict:
    """A smart keypoint at x, y in percent of original = (width, height) in pixels."""
    return {
        "original_width": original[0],
        "original_height": original[1],
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": width, "keypointlabels": [label]},
        "is_positive": positive,
        "id": "kp1",
        "from_name": "point",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
        **extra,
    }


def brush(mask: np.ndarray, label: str = "Nucleus", region_id: str = "b1", from_name: str = "tag") -> dict:
    """A brush region holding (H, W) bool `mask` as Label Studio RLE."""
    from backends.masks.rle import encode_rle

    height, width = mask.shape
    return {
        "id": region_id,
        "from_name": from_name,
        "to_name": "image",
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": encode_rle(mask), "brushlabels": [label]},
    }


# ----------------------------------------------------------------------------- request bodies


def predict_body(tasks: list, context: Any = None, config: str | None = LABEL_CONFIG, **params: Any) -> dict:
    """A /predict body; `config` None leaves label_config out (the backend uses /setup's)."""
    body = {
        "tasks": tasks,
        "project": PROJECT,
        "label_config": config,
        "params": {"login": None, "password": None, "context": context, **params},
    }
    if config is None:
        del body["label_config"]
    return body


def setup_body(
    config: str = LABEL_CONFIG,
    access_token: str = "",
    hostname: str = "http://localhost:8080",
    extra_params: Any = None,
) -> dict:
    return {
        "project": PROJECT,
        "schema": config,
        "hostname": hostname,
        "access_token": access_token,
        "extra_params": extra_params,
    }


def webhook_body(action: str, project_id: int = 1, config: str = LABEL_CONFIG, **extra: Any) -> dict:
    """A webhook event for project `project_id`; ANNOTATION_* events carry an annotation and its task."""
    body = {"action": action, "project": {"id": project_id, "label_config": config}, **extra}
    if action.startswith("ANNOTATION"):
        body |= {"annotation": {"id": 1, "result": []}, "task": {"id": 1}}
    return body
