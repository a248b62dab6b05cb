"""Zero-shot pre-annotation on day one, with a real Label Studio 1.23 and `python -m segmentation`.

A pretrained SegFormer (tiny, random, saved with save_pretrained; nothing downloaded) whose
classes cover the project's labels is the backend's model before any training. Opening a task
(Label Studio's `GET /api/tasks/{id}`, what its UI does) and the Data Manager's "Retrieve
predictions" action store its prediction: model_version `pretrained-<folder>`, brush regions with
the project's own label names, read back through Label Studio's API. Two ways to cover the
labels: SEG_LABEL_MAP, and the default case-insensitive name matching. /health says which labels
it predicts and from which model. With SEG_REFRESH on (the default) the backend writes the
predictions of every unlabeled task itself when it starts serving the project.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from backends.masks.rle import decode_rle
from tests.e2e.test_segmentation_training import retrieve_predictions, stored_predictions
from tests.support.tiny_hf_models import save_tiny_segformer

pytestmark = pytest.mark.e2e

SIZE = (48, 64)  # height, width of the uploaded images
UPPER_CLOTHES = 1  # the model class the tiny model is made to favour everywhere
VERSION = "pretrained-segformer-clothes"  # the model_version of its predictions: its folder's name
DEADLINE_S = 30.0


def brush_config(labels: list[str]) -> str:
    choices = "".join(f'<Label value="{label}"/>' for label in labels)
    return (
        f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{choices}'
        "</BrushLabels></View>"
    )


def check_prediction(label_studio, task_id: int, expected_label: str) -> None:
    """The task holds exactly one prediction: the pretrained model's, the favoured class's brush
    under the project's label name, covering the image."""
    (prediction,) = stored_predictions(label_studio, task_id)
    assert prediction["model_version"] == VERSION, prediction["model_version"]
    (region,) = prediction["result"]  # only the favoured class is anywhere
    assert region["type"] == "brushlabels" and region["from_name"] == "tag", region
    assert region["value"]["brushlabels"] == [expected_label]
    assert (region["original_height"], region["original_width"]) == SIZE
    mask = decode_rle(region["value"]["rle"], *SIZE)
    assert mask.mean() > 0.9, mask.mean()  # the favoured class covers the image
    assert 0.9 < prediction["score"] <= 1.0


def open_task(label_studio, task_id: int) -> None:
    """What the labeling UI does on opening a task: Label Studio asks /predict when the task has
    no prediction yet (show_collab_predictions is on by default) and stores the answer."""
    response = label_studio.http.get(f"{label_studio.url}/api/tasks/{task_id}", timeout=120)
    assert response.status_code == 200, response.text[:300]


@pytest.mark.parametrize(
    ("label_map", "project_labels", "expected_label", "fallback_labels", "refresh"),
    [
        ("Upper-clothes=Top,Pants=Trousers", ["Top", "Trousers"], "Top", ["Top", "Trousers"], False),
        ("", ["upper-clothes", "Pants"], "upper-clothes", ["Upper-clothes", "Pants", "Hair"], True),
    ],
    ids=["label-map-on-open", "name-match-refreshed"],
)
def test_a_pretrained_model_pre_annotates_before_any_training(
    label_studio, start_backend, tmp_path, label_map, project_labels, expected_label, fallback_labels, refresh
):
    """SEG_REFRESH=false: the predictions come from opening the task and from "Retrieve
    predictions". Default (refresh on): the backend writes them for every unlabeled task as soon
    as it serves the project, and opening the task later asks for nothing more."""
    model = save_tiny_segformer(tmp_path / "segformer-clothes", favour=UPPER_CLOTHES)
    rng = np.random.default_rng(0)
    images = []
    for index in range(2):
        path = tmp_path / f"photo-{index}.png"
        Image.fromarray(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)).save(path)
        images.append(path)
    ls = label_studio.ls
    project = ls.projects.create(title=f"zero-shot {label_map or 'by name'}", label_config=brush_config(project_labels))
    opened, retrieved = label_studio.upload_files(project.id, images)

    env = {"DEVICE": "cpu", "SEG_CHECKPOINT": str(model), "SEG_LABEL_MAP": label_map, "TRAIN_EVERY": "1000"}
    env["SEG_REFRESH"] = "true" if refresh else "false"
    backend = start_backend("segmentation", env=env)
    health = backend.health()
    assert health["model_state"] == "ready", health
    assert health["fallback_model"] == VERSION, health
    assert health["fallback_labels"] == fallback_labels, health
    assert health["fallback_source"] == str(model), health
    ml = ls.ml.create(project=project.id, url=backend.url, title="pretrained SegFormer")
    assert ls.ml.get(id=ml.id).state == "CO", f"backend not connected; log: {backend.log_path}"

    if refresh:
        deadline, state = time.monotonic() + DEADLINE_S, {}
        while time.monotonic() < deadline and state.get("state") not in ("done", "failed"):
            time.sleep(0.5)
            state = backend.health().get("refresh", {}).get("projects", {}).get(str(project.id), {})
        assert state.get("state") == "done" and state.get("refreshed") == 2, f"{state}; log: {backend.log_path}"
        open_task(label_studio, opened)
    else:
        assert stored_predictions(label_studio, opened) == []
        open_task(label_studio, opened)
        check_prediction(label_studio, opened, expected_label)
        assert stored_predictions(label_studio, retrieved) == []  # nothing written behind Label Studio's back
        retrieve_predictions(label_studio, project.id, [retrieved])
    for task_id in (opened, retrieved):
        check_prediction(label_studio, task_id, expected_label)
