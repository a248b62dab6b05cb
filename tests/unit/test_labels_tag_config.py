"""The default label_config.xml: one Labels tag shared by unlabelled tools (Rectangle / KeyPoint
prompts, Brush / Polygon outputs). Label Studio 1.23's editor sends such a prompt as the tool's
result plus a `labels` result with the same id, and saves such a mask the same way; the backends
read both and answer in that shape (what the editor itself would save, with no stray results)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backends.errors import BadRequest
from backends.label_studio.label_config import parse_label_config, require_segmentation_output
from backends.label_studio.regions import mask_regions, results_to_class_mask
from backends.masks.rle import decode_rle
from sam.last_regions import LastRegions
from sam.prompts import Prompt, parse_context

REPO = Path(__file__).resolve().parents[2]
CONFIG = parse_label_config((REPO / "label_config.xml").read_text())
W, H = 160, 120


def tool_and_labels(kind: str, value: dict, label: str | None, region_id: str = "r1", **extra) -> list[dict]:
    """What the editor sends for an unlabelled tool's region: the tool's result and its labels."""
    base = {"original_width": W, "original_height": H, "image_rotation": 0, "id": region_id, "to_name": "image"}
    tool = {**base, "type": kind, "from_name": "box" if kind == "rectangle" else "point", "value": value, **extra}
    if label is None:
        return [tool]
    return [tool, {**base, "type": "labels", "from_name": "label", "value": {**value, "labels": [label]}, **extra}]


def test_the_default_config_declares_one_labels_tag_for_every_tool():
    require_segmentation_output(CONFIG)
    tags = {tag.name: tag for tag in CONFIG.controls}
    assert [tags[name].type for name in ("label", "box", "point", "tag", "polygon")] == [
        "Labels",
        "Rectangle",
        "KeyPoint",
        "Brush",
        "Polygon",
    ]
    for name in ("box", "point", "tag", "polygon"):
        assert tags[name].labels == ("Nucleus", "Cell")
        assert tags[name].labels_tag("Nucleus") == "label" and tags[name].labels_tag("Debris") is None
    assert tags["box"].smart_only and tags["point"].smart_only
    assert not tags["tag"].smart and not tags["polygon"].smart  # no smart brush in the Auto-Detect group
    assert CONFIG.output_labels() == ("Nucleus", "Cell")
    assert [tag.name for tag in CONFIG.output_tags("image", "Cell")] == ["tag", "polygon"]


def test_a_label_in_two_labels_tags_comes_from_the_first():
    config = parse_label_config(
        """<View><Image name="image" value="$image"/>
        <Labels name="a" toName="image"><Label value="Nucleus"/></Labels>
        <Labels name="b" toName="image"><Label value="Nucleus"/><Label value="Cell"/></Labels>
        <Brush name="brush" toName="image"/></View>"""
    )
    (brush,) = config.output_tags("image")
    assert brush.labels == ("Nucleus", "Cell")
    assert (brush.labels_tag("Nucleus"), brush.labels_tag("Cell")) == ("a", "b")


def test_a_rectangle_and_a_keypoint_with_their_labels_results_become_prompts():
    context = {
        "result": tool_and_labels("rectangle", {"x": 10, "y": 10, "width": 50, "height": 50, "rotation": 0}, "Cell")
        + tool_and_labels("keypoint", {"x": 30, "y": 30, "width": 0.5}, "Cell", "k1", is_positive=False)
    }
    (prompt,) = parse_context(context, CONFIG).prompts(W, H)
    assert prompt.label == "Cell" and prompt.to_name == "image" and prompt.from_name == "box"
    assert prompt.box == pytest.approx((16, 12, 96, 72))
    assert prompt.points == ((48.0, 36.0),) and prompt.point_labels == (0,)


@pytest.mark.parametrize(
    ("results", "message"),
    [
        (tool_and_labels("rectangle", {"x": 10, "y": 10, "width": 5, "height": 5}, None), "no label chosen"),
        (tool_and_labels("rectangle", {"x": 10, "y": 10, "width": 5, "height": 5}, "Debris"), "'Debris'"),
        (tool_and_labels("rectangle", {"x": 1, "y": 1, "width": 5, "height": 5}, "Cell")[1:], "without a rectangle"),
        (tool_and_labels("brush", {"format": "rle", "rle": [0]}, "Cell"), "unsupported type 'brush'"),
    ],
)
def test_an_unusable_tool_context_is_refused_with_the_reason(results, message):
    with pytest.raises(BadRequest, match=message):
        parse_context({"result": results}, CONFIG)


def test_negative_only_clicks_are_kept_only_when_asked():
    context = parse_context(
        {"result": tool_and_labels("keypoint", {"x": 30, "y": 30}, "Cell", is_positive=False)}, CONFIG
    )
    assert context.prompts(W, H) == []
    (negative,) = context.prompts(W, H, keep_negative_only=True)
    assert negative.box is None and negative.point_labels == (0,)


def test_a_mask_answer_is_the_brush_result_and_its_labels_result_with_one_id():
    mask = np.zeros((H, W), bool)
    mask[20:40, 30:70] = True
    brush = CONFIG.output_tags("image", "Cell")[0]
    tool, labels = mask_regions(mask, "Cell", brush, score=0.5, to_name="image", first_id="keep-me")
    assert tool["id"] == labels["id"] == "keep-me"
    assert (tool["type"], tool["from_name"], labels["type"], labels["from_name"]) == ("brush", "tag", "labels", "label")
    assert set(tool["value"]) == {"format", "rle"} and labels["value"]["labels"] == ["Cell"]
    assert np.array_equal(decode_rle(labels["value"]["rle"], H, W), mask)
    # the same pair is what export_masks and training read (the tool's half carries no label)
    class_mask, warnings = results_to_class_mask([tool, labels], {"Nucleus": 1, "Cell": 2}, H, W)
    assert warnings == [] and np.array_equal(class_mask == 2, mask) and not (class_mask == 1).any()


def test_polygon_answers_and_labels_results_of_rectangles_are_read_right():
    mask = np.zeros((H, W), bool)
    mask[60:100, 20:60] = True
    polygon = CONFIG.output_tags("image", "Nucleus")[1]
    results = mask_regions(mask, "Nucleus", polygon, to_name="image")
    assert [r["type"] for r in results] == ["polygon", "labels"] and "points" in results[1]["value"]
    prompt_leftover = tool_and_labels("rectangle", {"x": 1, "y": 1, "width": 50, "height": 50}, "Cell", "r9")
    class_mask, warnings = results_to_class_mask(results + prompt_leftover, {"Nucleus": 1, "Cell": 2}, H, W)
    assert warnings == [] and not (class_mask == 2).any()
    assert (class_mask == 1).sum() == pytest.approx(mask.sum(), rel=0.1)


def test_clicks_inside_an_answered_box_refine_that_region_and_keep_its_id():
    memory = LastRegions(max_images=2, per_image=4)
    box = Prompt("Nucleus", "image", box=(10, 10, 50, 50))
    memory.remember("img", box, "r1")
    memory.remember("img", Prompt("Nucleus", "image", box=(0, 0, 100, 100)), "big")
    click = Prompt("Nucleus", "image", points=((30.0, 30.0),), point_labels=(0,))
    earlier = memory.refinement("img", click)
    assert earlier is not None and earlier.region_id == "r1"  # the smallest box holding the click
    assert earlier.prompt.box == box.box and earlier.prompt.point_labels == (0,)
    memory.remember("img", earlier.prompt, "r1")
    again = memory.refinement(
        "img", Prompt("Nucleus", "image", points=((30.0, 30.0), (20.0, 20.0)), point_labels=(0, 1))
    )
    assert again is not None and again.prompt.points == ((30.0, 30.0), (20.0, 20.0))  # resent click not doubled
    assert memory.refinement("img", Prompt("Cell", "image", points=((30.0, 30.0),), point_labels=(0,))) is None
    assert memory.refinement("other", click) is None
    memory.remember("b", box, "x")
    memory.remember("c", box, "y")  # over max_images: the least recently used image goes
    assert memory.refinement("img", click) is None
