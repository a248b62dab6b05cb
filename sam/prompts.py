"""Label Studio interactive context -> engine prompts (pure; no I/O).

Label Studio's smart tools send `params.context = {"result": [region, ...]}` where a region is a
smart rectangle (`type` "rectanglelabels", value {x, y, width, height, rotation, rectanglelabels})
or a keypoint (`type` "keypointlabels", value {x, y, width, keypointlabels} plus `is_positive`).
x, y, width, height are PERCENT of original_width / original_height; rectangle rotation is in
degrees, clockwise around the rectangle's top-left corner.

Prompts come out in PIXELS of the original image (x right, y down):
- one prompt per rectangle (each gives its own region); keypoints inside a rectangle refine it
  (the smallest rectangle containing the point);
- keypoints outside every rectangle form points-only prompts, one per label, each needing at
  least one positive point (negative points alone describe no object and are dropped, unless the
  caller asks for them: sam.last_regions may know the region they correct).
The prompt's label is the region's label; the backend maps it to the output label of that name.

`parse_context` checks a context once per request, before any image is fetched;
`PromptContext.prompts(width, height)` then gives each task's prompts in its image's pixels.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from backends.errors import BadRequest
from backends.label_studio.label_config import LabelConfig
from backends.masks.coords import percent_box_to_pixels, percent_point_to_pixels
from sam.text_prompts import TEXTAREA, TextPrompt, text_prompts

RECTANGLE = "rectanglelabels"
KEYPOINT = "keypointlabels"
# Unlabelled tools (`<Rectangle>` / `<KeyPoint>` next to a `<Labels>` tag): the editor sends the
# tool's result and the Labels tag's result (type "labels") with the same id; the label is in the latter.
TOOL_KINDS = {"rectangle": RECTANGLE, "keypoint": KEYPOINT}
LABELS = "labels"


@dataclass(frozen=True)
class Prompt:
    """One object to segment.

    box: (x0, y0, x1, y1) pixels of the original image, clipped to it, or None (points only).
    points: ((x, y), ...) pixels; point_labels: 1 positive / 0 negative, one per point.
    label: the output label name; to_name: the Image tag the prompt was drawn on; from_name: the
    smart tool (RectangleLabels / KeyPointLabels tag) that drew it.
    """

    label: str
    to_name: str
    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] = ()
    point_labels: tuple[int, ...] = ()
    from_name: str = ""


@dataclass(frozen=True)
class _SmartRegion:
    """A checked context region: `kind` RECTANGLE or KEYPOINT, its label, its percent `value`."""

    kind: str
    label: str
    value: Mapping[str, Any]
    positive: bool
    from_name: str
    where: str  # "context region <index>", for messages
    region_id: str = ""


@dataclass(frozen=True)
class _Point:
    xy: tuple[float, float]
    positive: bool
    label: str
    from_name: str


@dataclass(frozen=True)
class PromptContext:
    """An interactive context, checked once per request (see `parse_context`).

    image: the Image tag the smart tools were used on; regions: the context's regions, shape
    checked (objects with a 'value' object, tag names as strings), in order.
    """

    image: str
    regions: tuple[Mapping[str, Any], ...]
    _smart: tuple[_SmartRegion, ...] = field(repr=False)
    texts: tuple[TextPrompt, ...] = ()  # text (concept) prompts from a smart TextArea (SAM 3)

    def prompts(self, width: int, height: int, keep_negative_only: bool = False) -> list[Prompt]:
        """The prompts in pixels of this image, `width` x `height` (the task's original image).

        Clicks of a label with no positive one are dropped unless `keep_negative_only` (the caller
        may know the region they correct). Raises BadRequest for NaN or non-numbers, zero area,
        and prompts outside the image.
        """
        boxes: list[tuple[tuple[float, float, float, float], str, str]] = []
        points: list[_Point] = []
        for region in self._smart:
            if region.kind == RECTANGLE:
                boxes.append((_box(region.value, width, height, region.where), region.label, region.from_name))
            else:
                xy = _point(region.value, width, height, region.where)
                points.append(_Point(xy, region.positive, region.label, region.from_name))
        return _assemble(boxes, points, self.image, keep_negative_only)


def parse_context(
    context: Any, config: LabelConfig, task_count: int = 1, max_prompts: int | None = None
) -> PromptContext:
    """Check Label Studio's interactive context once, before any image is fetched.

    In order: its shape (an object with a 'result' list), the number of prompts (regions x tasks,
    each costing an engine call and a mask: at most `max_prompts`, MAX_PROMPTS_PER_REQUEST), each
    region's shape ('value' object, 'to_name' / 'from_name' strings), the image they were drawn on
    (one Image tag of `config`: the regions' to_name, else its primary image), and each region's
    image rotation (0 only), type and label (one that a brush or polygon tag on that image has, so
    every prompt's mask has a tag to go to). Raises BadRequest saying what is wrong.
    """
    regions = _result_list(context)
    if max_prompts is not None:
        _check_prompt_count(len(regions), task_count, max_prompts)
    for index, region in enumerate(regions):
        _check_region_shape(region, f"context region {index}")
    image = _prompted_image(regions, config)
    labels = {label: None for tag in config.output_tags(image) for label in tag.labels}
    twins = _labels_by_id(regions)
    smart = tuple(
        _smart_region(region, f"context region {index}", image, labels, twins)
        for index, region in enumerate(regions)
        if region.get("type") not in (TEXTAREA, LABELS)
    )
    _refuse_orphan_labels(regions, smart)
    return PromptContext(image, tuple(regions), smart, tuple(text_prompts(regions)))


def _labels_by_id(regions: list[Mapping[str, Any]]) -> dict[str, Any]:
    """{region id: value.labels} of the context's Labels-tag results (the twins of unlabelled tools)."""
    return {
        str(region.get("id")): region["value"].get(LABELS)
        for region in regions
        if region.get("type") == LABELS and region.get("id") is not None
    }


def _refuse_orphan_labels(regions: list[Mapping[str, Any]], smart: tuple[_SmartRegion, ...]) -> None:
    tool_ids = {region.region_id for region in smart}
    for index, region in enumerate(regions):
        if region.get("type") == LABELS and str(region.get("id")) not in tool_ids:
            raise BadRequest(
                f"context region {index}: a 'labels' result without a rectangle or keypoint of the same id "
                "(smart tools send the tool's result and its labels together)"
            )


def _result_list(context: Any) -> list:
    if not isinstance(context, Mapping):
        raise BadRequest(f"interactive context must be an object with a 'result' list, got {type(context).__name__}")
    regions = context.get("result")
    if not isinstance(regions, list):
        raise BadRequest(f"interactive context has no 'result' list (got {type(regions).__name__})")
    return regions


def _check_prompt_count(regions: int, task_count: int, limit: int) -> None:
    """Checked before any region is read: a huge context costs nothing."""
    prompts = regions * max(task_count, 1)
    if prompts > limit:
        raise BadRequest(
            f"this interactive request holds {prompts} prompts ({regions} context regions x "
            f"{max(task_count, 1)} tasks); at most {limit} are accepted per request (MAX_PROMPTS_PER_REQUEST)"
        )


def _check_region_shape(region: Any, where: str) -> None:
    if not isinstance(region, Mapping) or not isinstance(region.get("value"), Mapping):
        raise BadRequest(f"{where}: expected an object with a 'value' object")
    for key in ("to_name", "from_name"):
        name = region.get(key)
        if name is not None and not isinstance(name, str):
            raise BadRequest(f"{where}: {key} must be a tag name (a string), got {type(name).__name__}")


def _prompted_image(regions: list[Mapping[str, Any]], config: LabelConfig) -> str:
    """The Image tag the smart tools were used on (the regions' to_name), else the primary image."""
    names = {str(region["to_name"]) for region in regions if region.get("to_name") is not None}
    if len(names) > 1:
        raise BadRequest(f"interactive prompts on several images at once ({', '.join(sorted(names))})")
    name = names.pop() if names else config.primary_image()
    if name is None or name not in config.images:
        raise BadRequest(f"the label config has no Image tag named {name!r}")
    return name


def _smart_region(
    region: Mapping[str, Any], where: str, image: str, known_labels: Collection[str], twins: Mapping[str, Any]
) -> _SmartRegion:
    _refuse_rotated_image(region, where)
    kind = region.get("type")
    region_id = str(region.get("id"))
    if kind in TOOL_KINDS:  # an unlabelled tool: its label is in the Labels result of the same id
        kind = TOOL_KINDS[kind]
        names = twins.get(region_id) if region.get("id") is not None else None
    elif kind in (RECTANGLE, KEYPOINT):
        names = region["value"].get(kind)
    else:
        raise BadRequest(
            f"{where}: unsupported type {kind!r} (smart tools send rectanglelabels or keypointlabels, or a "
            "rectangle or keypoint with its labels)"
        )
    label = _label(names, kind, where, image, known_labels)
    return _SmartRegion(
        kind, label, region["value"], _is_positive(region), str(region.get("from_name") or ""), where, region_id
    )


def _assemble(
    boxes: list[tuple[tuple[float, float, float, float], str, str]],
    points: list[_Point],
    image: str,
    keep_negative_only: bool = False,
) -> list[Prompt]:
    refining: list[list[_Point]] = [[] for _ in boxes]
    loose: list[_Point] = []
    for point in points:
        inside = [i for i, (box, *_) in enumerate(boxes) if _contains(box, point.xy)]
        if inside:
            smallest = min(inside, key=lambda i: _area(boxes[i][0]))
            refining[smallest].append(point)
        else:
            loose.append(point)
    prompts = [
        Prompt(label, image, box, tuple(p.xy for p in extra), tuple(int(p.positive) for p in extra), from_name)
        for (box, label, from_name), extra in zip(boxes, refining, strict=True)
    ]
    for label in dict.fromkeys(p.label for p in loose):  # first-seen order
        group = [p for p in loose if p.label == label]
        if keep_negative_only or any(p.positive for p in group):
            xy, signs = tuple(p.xy for p in group), tuple(int(p.positive) for p in group)
            prompts.append(Prompt(label, image, None, xy, signs, group[0].from_name))
    return prompts


def _refuse_rotated_image(region: Mapping[str, Any], where: str) -> None:
    rotation = region.get("image_rotation", 0) or 0
    try:
        rotated = float(rotation) % 360 != 0
    except (TypeError, ValueError):
        raise BadRequest(f"{where}: image_rotation {rotation!r} is not a number") from None
    if rotated:
        raise BadRequest(
            f"{where}: the image is rotated by {rotation} degrees in the editor; smart prompts on rotated "
            "images are not supported -- reset the rotation and draw the prompt again"
        )


def _label(names: Any, kind: str, where: str, image: str, known_labels: Collection[str]) -> str:
    """The region's label (`names`: its labels list): one that a brush or polygon tag on `image` has."""
    if not isinstance(names, list) or not names or not isinstance(names[0], str) or not names[0]:
        raise BadRequest(f"{where}: no label chosen ({kind} without a label); pick a label before drawing")
    label = names[0]
    if label not in known_labels:
        raise BadRequest(
            f"{where}: label {label!r} has no output label of the same name on image {image!r} in the "
            f"labeling config (known: {', '.join(sorted(known_labels)) or 'none'})"
        )
    return label


def _box(value: Mapping[str, Any], width: int, height: int, where: str) -> tuple[float, float, float, float]:
    """Percent rectangle (possibly rotated: its axis-aligned hull) -> XYXY pixels clipped to the image."""
    try:
        box = percent_box_to_pixels(value, width, height)
    except BadRequest as error:
        raise BadRequest(f"{where}: {error.message}") from None
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        raise BadRequest(f"{where}: the rectangle covers less than one pixel of the {width}x{height} image (zero area)")
    return box


def _point(value: Mapping[str, Any], width: int, height: int, where: str) -> tuple[float, float]:
    """Percent keypoint -> (x, y) pixels, kept inside the last pixel row / column."""
    try:
        x, y = percent_point_to_pixels(value, width, height)
    except BadRequest as error:
        raise BadRequest(f"{where}: {error.message}") from None
    return min(x, width - 0.5), min(y, height - 0.5)


def _is_positive(region: Mapping[str, Any]) -> bool:
    flag = region.get("is_positive", True)
    return flag is not False and str(flag).lower() not in {"false", "0"}


def _contains(box: tuple[float, float, float, float], xy: tuple[float, float]) -> bool:
    return box[0] <= xy[0] <= box[2] and box[1] <= xy[1] <= box[3]


def _area(box: tuple[float, float, float, float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])
