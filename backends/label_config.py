"""Label Studio label config (XML) -> the tags a segmentation backend cares about.

What is read:
- `<Image name="image" value="$image"/>`: the image tag and the task data key it shows.
- Control tags (anything with `name` and `toName`): output tags (BrushLabels, PolygonLabels, and
  the unlabelled Brush / Polygon tools, which take their labels from a Labels tag on the same
  image), prompt tags (RectangleLabels, KeyPointLabels, Rectangle, KeyPoint), and the rest kept
  as-is. `toName` may list several image names separated by commas.
- Labels are the `value` of `<Label>` children (not `alias`), in document order, deduplicated.
- `smart="true"` or `smartOnly="true"` marks a tag as a smart (interactive) tool.
Tag names are matched case-insensitively and reported in Label Studio's canonical spelling.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import Mapping

from backends.errors import BadRequest

BRUSH_TYPES = ("BrushLabels", "Brush")
POLYGON_TYPES = ("PolygonLabels", "Polygon")
PROMPT_TYPES = ("RectangleLabels", "KeyPointLabels", "Rectangle", "KeyPoint")
_CANONICAL = {
    name.lower(): name
    for name in (*BRUSH_TYPES, *POLYGON_TYPES, *PROMPT_TYPES, "Labels", "Image", "Label", "Choices",
                 "TextArea", "Taxonomy", "Ellipse", "EllipseLabels", "Magicwand")
}
_TRUE = {"true", "1", "yes"}


class LabelConfigError(BadRequest):
    """The label config is malformed or lacks what the backend needs."""


@dataclass(frozen=True)
class ControlTag:
    """A control tag: `name`, canonical `type` ("BrushLabels", ...), the Image it labels.

    `to_name` is the first image name of `toName`; `to_names` all of them.
    """

    name: str
    type: str
    to_name: str
    labels: tuple[str, ...]
    smart: bool
    to_names: tuple[str, ...] = ()
    smart_only: bool = False

    def __post_init__(self) -> None:
        if not self.to_names:
            object.__setattr__(self, "to_names", (self.to_name,))

    def targets(self, to_name: str) -> bool:
        return to_name in self.to_names


@dataclass(frozen=True)
class LabelConfig:
    """The parsed config: `images` maps Image tag name -> task data key (without the '$')."""

    images: Mapping[str, str]
    controls: tuple[ControlTag, ...]

    def control(self, name: str) -> ControlTag | None:
        return next((tag for tag in self.controls if tag.name == name), None)

    def brush_for(self, to_name: str) -> ControlTag | None:
        """The BrushLabels (else Brush) tag drawing on Image `to_name`, or None."""
        return self._first(BRUSH_TYPES, to_name)

    def polygon_for(self, to_name: str) -> ControlTag | None:
        """The PolygonLabels (else Polygon) tag drawing on Image `to_name`, or None."""
        return self._first(POLYGON_TYPES, to_name)

    def prompt_tags(self) -> tuple[ControlTag, ...]:
        """RectangleLabels / KeyPointLabels (and Rectangle / KeyPoint) tags on an Image."""
        return tuple(
            tag for tag in self.controls
            if tag.type in PROMPT_TYPES and any(name in self.images for name in tag.to_names)
        )

    def output_tags(self) -> tuple[ControlTag, ...]:
        """Brush and polygon tags on an Image, in document order."""
        return tuple(
            tag for tag in self.controls
            if tag.type in BRUSH_TYPES + POLYGON_TYPES
            and any(name in self.images for name in tag.to_names)
        )

    def output_labels(self) -> tuple[str, ...]:
        """Ordered union of the brush and polygon tags' labels: the segmentation label map order.

        Index 0 is background in a class-index mask, so label k (0-based here) is class k + 1.
        """
        seen: dict[str, None] = {}
        for tag in self.output_tags():
            seen.update(dict.fromkeys(tag.labels))
        return tuple(seen)

    def output_for_prompt(self, prompt_tag_name: str, label: str) -> tuple[ControlTag, str]:
        """The brush tag on the prompt's image that has `label`, and that label.

        Raises BadRequest when the prompt tag is unknown or no brush tag on its image has the label.
        """
        prompt = self.control(prompt_tag_name)
        if prompt is None:
            raise BadRequest(f"the label config has no tag named '{prompt_tag_name}'")
        for to_name in prompt.to_names:
            for tag in self.controls:
                if tag.type in BRUSH_TYPES and tag.targets(to_name) and label in tag.labels:
                    return tag, label
        raise BadRequest(
            f"no BrushLabels tag on image '{prompt.to_name}' has the label '{label}' "
            f"(prompt tag '{prompt_tag_name}')"
        )

    def _first(self, types: tuple[str, ...], to_name: str) -> ControlTag | None:
        for kind in types:
            for tag in self.controls:
                if tag.type == kind and tag.targets(to_name):
                    return tag
        return None


def parse_label_config(xml: str) -> LabelConfig:
    """Parse a label config XML string; LabelConfigError when it is not well-formed XML."""
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the label config is empty")
    # The stdlib parser expands internal entities: refuse DTDs outright (no billion laughs).
    if re.search(r"<!\s*(DOCTYPE|ENTITY)", xml, flags=re.IGNORECASE):
        raise LabelConfigError("the label config must not contain a DOCTYPE or ENTITY declaration")
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as exc:
        raise LabelConfigError(f"the label config is not well-formed XML: {exc}") from None
    except UnicodeError:  # the parser encodes the text first: a lone surrogate ("\\ud800") cannot be
        raise LabelConfigError("the label config is not valid Unicode text (it holds a lone surrogate)") from None

    images: dict[str, str] = {}
    controls: list[ControlTag] = []
    for element in root.iter():
        kind = _CANONICAL.get(str(element.tag).lower(), str(element.tag))
        name = element.get("name")
        if kind == "Image" and name:
            value = element.get("value") or element.get("valueList") or ""
            if value.startswith("$"):
                images[name] = value[1:]
            continue
        to_names = tuple(part.strip() for part in (element.get("toName") or "").split(",") if part.strip())
        if not name or not to_names:
            continue
        labels = tuple(dict.fromkeys(
            label.get("value") for label in element.iter()
            if str(label.tag).lower() == "label" and label.get("value") is not None
        ))
        smart_only = (element.get("smartOnly") or "").lower() in _TRUE
        controls.append(ControlTag(
            name=name,
            type=kind,
            to_name=to_names[0],
            labels=labels,
            smart=smart_only or (element.get("smart") or "").lower() in _TRUE,
            to_names=to_names,
            smart_only=smart_only,
        ))
    return LabelConfig(images=images, controls=tuple(_inherit_labels(controls)))


def _inherit_labels(controls: list[ControlTag]) -> list[ControlTag]:
    """Unlabelled Brush/Polygon/Rectangle/KeyPoint tools take the labels of a Labels tag on the same image."""
    shared = [tag for tag in controls if tag.type == "Labels"]
    result = []
    for tag in controls:
        if tag.type in ("Brush", "Polygon", "Rectangle", "KeyPoint") and not tag.labels:
            inherited: dict[str, None] = {}
            for labels_tag in shared:
                if set(labels_tag.to_names) & set(tag.to_names):
                    inherited.update(dict.fromkeys(labels_tag.labels))
            tag = ControlTag(tag.name, tag.type, tag.to_name, tuple(inherited), tag.smart,
                             tag.to_names, tag.smart_only)
        result.append(tag)
    return result


def require_segmentation_output(config: LabelConfig) -> None:
    """LabelConfigError unless a BrushLabels/PolygonLabels (or Brush/Polygon) tag with labels
    draws on an Image tag of the config."""
    if not config.images:
        raise LabelConfigError("the label config has no <Image> tag with a $variable value")
    tags = config.output_tags()
    if not tags:
        raise LabelConfigError(
            "the label config has no BrushLabels or PolygonLabels tag bound to an <Image> "
            f"(images: {', '.join(config.images)})"
        )
    if not any(tag.labels for tag in tags):
        raise LabelConfigError(
            f"the output tag '{tags[0].name}' has no <Label value=...> children"
        )
