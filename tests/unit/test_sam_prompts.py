"""Interactive context (Label Studio 1.23 smart tools) -> prompts in pixels."""

from __future__ import annotations

import math

import pytest

from backends.errors import BadRequest
from backends.label_studio.label_config import parse_label_config
from sam.prompts import Prompt, parse_context
from tests.support import payloads

W, H = 200, 100
CONFIG = parse_label_config("""
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Nucleus"/><Label value="Cell"/></BrushLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Nucleus"/><Label value="Cell"/></RectangleLabels>
  <KeyPointLabels name="point" toName="image" smart="true"><Label value="Nucleus"/><Label value="Cell"/></KeyPointLabels>
</View>""")


def rectangle(x, y, width, height, label="Nucleus", rotation=0, image_rotation=0):
    return payloads.rectangle(x, y, width, height, label, (W, H), rotation, image_rotation=image_rotation, id="r1")


def keypoint(x, y, positive=True, label="Nucleus"):
    return payloads.keypoint(x, y, positive, label, (W, H), width=0.5, id="k1")


def parse(*regions):
    return parse_context({"result": list(regions)}, CONFIG).prompts(W, H)


def test_rectangle_percent_to_pixels():
    (prompt,) = parse(rectangle(10, 20, 50, 40))
    assert prompt == Prompt("Nucleus", "image", (20.0, 20.0, 120.0, 60.0), (), (), "box")


def test_keypoints_inside_refine_the_rectangle_and_loose_ones_form_their_own_prompt():
    prompts = parse(
        rectangle(10, 20, 50, 40), keypoint(30, 40), keypoint(20, 30, positive=False), keypoint(90, 90, label="Cell")
    )
    assert len(prompts) == 2
    box, loose = prompts
    assert box.box == (20.0, 20.0, 120.0, 60.0)
    assert box.points == ((60.0, 40.0), (40.0, 30.0)) and box.point_labels == (1, 0)
    assert loose == Prompt("Cell", "image", None, ((180.0, 90.0),), (1,), "point")


def test_keypoints_only_give_one_points_prompt():
    (prompt,) = parse(keypoint(50, 50), keypoint(10, 10, positive=False))
    assert prompt.box is None and prompt.label == "Nucleus"
    assert prompt.points == ((100.0, 50.0), (20.0, 10.0)) and prompt.point_labels == (1, 0)


def test_negative_points_alone_describe_nothing():
    assert parse(keypoint(50, 50, positive=False)) == []


def test_two_rectangles_two_prompts_and_a_point_goes_to_the_smallest_holding_it():
    prompts = parse(rectangle(0, 0, 100, 100, label="Cell"), rectangle(10, 10, 20, 20), keypoint(15, 15))
    assert [p.label for p in prompts] == ["Cell", "Nucleus"]
    assert prompts[0].points == () and prompts[1].points == ((30.0, 15.0),)


def test_rectangle_partly_outside_is_clipped_and_rotated_one_uses_its_hull():
    (prompt,) = parse(rectangle(90, 50, 30, 80))
    assert prompt.box == (180.0, 50.0, 200.0, 100.0)
    (rotated,) = parse(rectangle(25, 25, 10, 10, rotation=90))
    x0, y0, x1, y1 = rotated.box  # 20x10 px turned clockwise about (50, 25): 10 wide, 20 tall
    assert math.isclose(x0, 40.0) and math.isclose(x1, 50.0) and math.isclose(y0, 25.0) and math.isclose(y1, 45.0)


@pytest.mark.parametrize(
    "region, message",
    [
        (rectangle(10, 10, 0, 20), "no area"),
        (rectangle(150, 150, 10, 10), "outside the 200x100 image"),
        (rectangle(float("nan"), 10, 10, 10), "finite"),
        (rectangle("10", 10, 10, 10), "must be a number"),
        (rectangle(10, 10, 10, 10, label="Mitochondrion"), "Mitochondrion"),
        (rectangle(10, 10, 10, 10, image_rotation=90), "rotated"),
        (keypoint(120, 50), "outside the image"),
        (
            {**rectangle(10, 10, 10, 10), "value": {"x": 1, "y": 1, "width": 1, "height": 1, "rectanglelabels": []}},
            "no label",
        ),
        ({**rectangle(10, 10, 10, 10), "type": "ellipselabels"}, "unsupported type"),
        ({"type": "rectanglelabels"}, "value"),
    ],
)
def test_bad_regions_are_refused_with_a_message(region, message):
    with pytest.raises(BadRequest, match=message):
        parse(region)


def test_context_without_result_list_is_refused():
    with pytest.raises(BadRequest, match="result"):
        parse_context({"foo": 1}, CONFIG)
    with pytest.raises(BadRequest):
        parse_context([], CONFIG)


@pytest.mark.parametrize(
    "context, message",
    [
        ({"result": True}, "'result' list"),
        ({"result": 5}, "'result' list"),
        ({"result": [{**rectangle(10, 10, 10, 10), "to_name": ["image"]}]}, "to_name must be a tag name"),
        ({"result": [{**rectangle(10, 10, 10, 10), "from_name": {"a": 1}}]}, "from_name must be a tag name"),
        ({"result": ["box"]}, "'value' object"),
    ],
)
def test_context_of_the_wrong_shape_is_refused_before_anything_reads_it(context, message):
    with pytest.raises(BadRequest, match=message):
        parse_context(context, CONFIG)


TWO_IMAGES = parse_label_config("""
<View>
  <Image name="left" value="$a"/><Image name="right" value="$b"/>
  <BrushLabels name="left_brush" toName="left"><Label value="Nucleus"/></BrushLabels>
  <BrushLabels name="right_brush" toName="right"><Label value="Cell"/></BrushLabels>
  <RectangleLabels name="box" toName="left,right" smart="true"><Label value="Nucleus"/><Label value="Cell"/></RectangleLabels>
</View>""")


def test_the_prompted_image_is_the_regions_to_name_else_the_primary_image():
    without_to_name = {k: v for k, v in rectangle(10, 20, 50, 40).items() if k != "to_name"}
    context = parse_context({"result": [without_to_name]}, TWO_IMAGES)
    assert context.image == "left" and context.prompts(W, H)[0].to_name == "left"
    right = {**rectangle(10, 20, 50, 40, label="Cell"), "to_name": "right"}
    assert parse_context({"result": [right]}, TWO_IMAGES).image == "right"


def test_a_label_that_no_output_tag_of_the_prompted_image_has_is_refused():
    on_right = {**rectangle(10, 20, 50, 40), "to_name": "right"}  # Nucleus: a label of the left image only
    with pytest.raises(BadRequest, match="'Nucleus'.*'right'"):
        parse_context({"result": [on_right]}, TWO_IMAGES)


def test_more_prompts_than_the_limit_are_refused_before_any_region_is_read():
    regions = ["not even a region"] * 4
    with pytest.raises(BadRequest, match="8 prompts.*MAX_PROMPTS_PER_REQUEST"):
        parse_context({"result": regions}, CONFIG, task_count=2, max_prompts=6)
    with pytest.raises(BadRequest, match="'value' object"):
        parse_context({"result": regions}, CONFIG, task_count=2, max_prompts=8)
