"""Label config parsing: upstream-style configs and adversarial ones."""

from __future__ import annotations

import pytest

from backends.errors import BadRequest
from backends.label_studio.label_config import (
    PROMPT_TYPES,
    ControlTag,
    LabelConfigError,
    parse_label_config,
    require_segmentation_output,
)

SAM_EXAMPLE = """
<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Banana" background="#FF0000"/>
    <Label value="Orange" background="#0d14d3"/>
  </BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Banana" smart="true" background="#000000" showInline="true"/>
    <Label value="Orange" smart="true" background="#000000" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true">
    <Label value="Banana" background="#000000" showInline="true"/>
    <Label value="Orange" background="#000000" showInline="true"/>
  </RectangleLabels>
</View>
"""


def test_sam_example_config():
    config = parse_label_config(SAM_EXAMPLE)
    assert config.images == {"image": "image"}
    brush = ControlTag("tag", "BrushLabels", "image", ("Banana", "Orange"), False)
    assert config.output_tags("image") == (brush,)  # the brush tag, and no polygon tag
    assert config.output_images() == ("image",) and config.primary_image() == "image"
    prompt_tags = [tag for tag in config.controls if tag.type in PROMPT_TYPES]
    assert [tag.name for tag in prompt_tags] == ["tag2", "tag3"]
    assert all(tag.smart for tag in prompt_tags)
    assert config.output_labels() == ("Banana", "Orange")
    assert config.output_tags("image", "Orange") == (brush,)
    require_segmentation_output(config)


def test_a_label_missing_from_the_brush_tag_has_no_output_tag():
    config = parse_label_config(SAM_EXAMPLE.replace('<Label value="Orange" background="#0d14d3"/>', ""))
    assert config.output_tags("image", "Orange") == ()
    assert [tag.name for tag in config.output_tags("image", "Banana")] == ["tag"]
    assert config.output_tags("nope") == ()


def test_nested_views_polygons_and_label_order():
    config = parse_label_config("""
    <View>
      <Header value="Segment cells"/>
      <View style="display:flex">
        <View><Image name="img" value="$url"/></View>
        <View>
          <PolygonLabels name="poly" toName="img" strokeWidth="2">
            <Label value="Mother"/><Label value="Bud"/>
          </PolygonLabels>
          <BrushLabels name="brush" toName="img">
            <Label value="Bud"/><Label value="Debris" alias="D"/><Label value="Bud"/>
          </BrushLabels>
        </View>
      </View>
    </View>""")
    assert config.images == {"img": "url"}
    polygon, brush = config.output_tags("img")
    assert polygon.type == "PolygonLabels" and polygon.labels == ("Mother", "Bud")
    assert brush.type == "BrushLabels" and brush.labels == ("Bud", "Debris")
    assert config.output_labels() == ("Mother", "Bud", "Debris")
    assert [tag for tag in config.controls if tag.type in PROMPT_TYPES] == []


def test_several_images_and_comma_separated_to_name():
    config = parse_label_config("""
    <View>
      <Image name="left" value="$a"/><Image name="right" value="$b"/>
      <BrushLabels name="brush" toName="left, right"><Label value="Cell"/></BrushLabels>
      <RectangleLabels name="box" toName="right" smartOnly="true"><Label value="Cell"/></RectangleLabels>
    </View>""")
    (brush,) = config.output_tags("right")
    assert config.output_tags("left") == (brush,)
    assert brush.to_name == "left" and brush.to_names == ("left", "right")
    assert config.output_images() == ("left", "right") and config.primary_image() == "left"
    (box,) = [tag for tag in config.controls if tag.type in PROMPT_TYPES]
    assert box.smart and box.smart_only
    assert config.output_tags("right", "Cell") == (brush,)


def test_brush_tool_with_a_separate_labels_tag():
    config = parse_label_config("""
    <View>
      <Image name="image" value="$image"/>
      <Labels name="labels" toName="image"><Label value="Nucleus"/><Label value="Cytoplasm"/></Labels>
      <Brush name="brush" toName="image"/>
      <KeyPoint name="kp" toName="image" smart="true"/>
    </View>""")
    (brush,) = config.output_tags("image")
    assert brush.type == "Brush" and brush.labels == ("Nucleus", "Cytoplasm")
    assert config.output_labels() == ("Nucleus", "Cytoplasm")
    assert config.output_tags("image", "Nucleus") == (brush,)
    require_segmentation_output(config)


def test_an_unlabelled_brush_gets_no_region_and_tag_case_is_ignored():
    config = parse_label_config("""
    <view>
      <image name="image" value="$image"/>
      <Brush name="plain" toName="image"/>
      <brushlabels name="labelled" toName="image"><label value="A"/></brushlabels>
    </view>""")
    (labelled,) = config.output_tags("image", "A")
    assert labelled.name == "labelled"
    assert labelled.type == "BrushLabels"


@pytest.mark.parametrize(
    "xml",
    [
        "",
        "   ",
        "<View>",
        "<View><Image name='i' value='$i'></View>",
        "not xml at all",
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">]><View>&lol;</View>',
        "<View>\ud800</View>",
    ],
    ids=["empty", "blank", "unclosed", "mismatched", "text", "entity", "lone-surrogate"],
)
def test_malformed_configs_raise_label_config_error(xml):
    with pytest.raises(LabelConfigError):
        parse_label_config(xml)


def test_label_config_error_is_a_bad_request():
    assert issubclass(LabelConfigError, BadRequest)


@pytest.mark.parametrize(
    "xml, message",
    [
        ('<View><Text name="t" value="$text"/><Labels name="l" toName="t"><Label value="A"/></Labels></View>', "Image"),
        (
            '<View><Image name="image" value="$image"/>'
            '<RectangleLabels name="r" toName="image"><Label value="A"/></RectangleLabels></View>',
            "BrushLabels",
        ),
        (
            '<View><Image name="image" value="$image"/><Image name="other" value="$o"/>'
            '<BrushLabels name="b" toName="missing"><Label value="A"/></BrushLabels></View>',
            "BrushLabels",
        ),
        ('<View><Image name="image" value="$image"/><BrushLabels name="b" toName="image"/></View>', "Label"),
    ],
    ids=["no-image", "no-output", "output-on-unknown-image", "output-without-labels"],
)
def test_configs_without_segmentation_output_are_refused(xml, message):
    config = parse_label_config(xml)
    with pytest.raises(LabelConfigError, match=message):
        require_segmentation_output(config)


def test_tags_without_name_or_to_name_are_ignored():
    config = parse_label_config("""
    <View><Image name="image" value="$image"/>
      <BrushLabels toName="image"><Label value="A"/></BrushLabels>
      <BrushLabels name="ok" toName="image"><Label value="B"/></BrushLabels>
      <Choices name="c" toName="image"><Choice value="x"/></Choices>
    </View>""")
    assert [tag.name for tag in config.controls] == ["ok", "c"]
    assert config.output_labels() == ("B",)
