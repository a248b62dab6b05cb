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
  least one positive point (negative points alone describe no object and are dropped).
The prompt's label is the region's label; the backend maps it to the output label of that name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Mapping

from backends.masks.coords import percent_box_to_pixels, percent_point_to_pixels
from backends.errors import BadRequest

RECTANGLE = "rectanglelabels"
KEYPOINT = "keypointlabels"


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
class _Point:
    xy: tuple[float, float]
    positive: bool
    label: str
    to_name: str
    from_name: str


def prompts_from_context(
    context: Mapping[str, Any] | None,
    width: int,
    height: int,
    known_labels: Collection[str] | None = None,
) -> list[Prompt]:
    """Parse the interactive context for an image of `width` x `height` pixels into prompts.

    `known_labels`: the labels the config can output for this image (None: accept any).
    Raises BadRequest (with a message) for malformed regions, NaN, zero area, prompts outside
    the image, a missing or unknown label, and image_rotation != 0 (not supported).
    """
    boxes: list[tuple[tuple[float, float, float, float], str, str, str]] = []
    points: list[_Point] = []
    for index, region in enumerate(context_regions(context)):
        where = f"context region {index}"
        _refuse_rotated_image(region, where)
        kind = region.get("type")
        if kind not in (RECTANGLE, KEYPOINT):
            raise BadRequest(f"{where}: unsupported type {kind!r} (smart tools send rectanglelabels or keypointlabels)")
        label = _label(region, kind, where, known_labels)
        to_name, from_name = str(region.get("to_name") or ""), str(region.get("from_name") or "")
        if kind == RECTANGLE:
            boxes.append((_box(region["value"], width, height, where), label, to_name, from_name))
        else:
            xy = _point(region["value"], width, height, where)
            points.append(_Point(xy, _is_positive(region), label, to_name, from_name))
    return _assemble(boxes, points)


def check_prompt_count(context: Any, task_count: int, limit: int) -> None:
    """BadRequest when an interactive request holds more than `limit` prompts (context regions x
    tasks, each costing an engine call and a mask); checked before any region is read."""
    regions = context.get("result") if isinstance(context, Mapping) else None
    if not isinstance(regions, list):
        return  # context_regions says what is wrong with it
    prompts = len(regions) * max(task_count, 1)
    if prompts > limit:
        raise BadRequest(
            f"this interactive request holds {prompts} prompts ({len(regions)} context regions x "
            f"{max(task_count, 1)} tasks); at most {limit} are accepted per request (MAX_PROMPTS_PER_REQUEST)"
        )


def context_regions(context: Any) -> list[Mapping[str, Any]]:
    """The regions of an interactive context, checked for shape before anything reads them.

    Label Studio sends `{"result": [region, ...]}`; every region must be an object with a 'value'
    object, and its 'to_name' / 'from_name' (tag names), when present, strings. Raises BadRequest
    otherwise. Values inside 'value' (numbers, labels) are checked by `prompts_from_context`.
    """
    if not isinstance(context, Mapping):
        raise BadRequest(f"interactive context must be an object with a 'result' list, got {type(context).__name__}")
    regions = context.get("result")
    if not isinstance(regions, list):
        raise BadRequest(f"interactive context has no 'result' list (got {type(regions).__name__})")
    for index, region in enumerate(regions):
        where = f"context region {index}"
        if not isinstance(region, Mapping) or not isinstance(region.get("value"), Mapping):
            raise BadRequest(f"{where}: expected an object with a 'value' object")
        for key in ("to_name", "from_name"):
            name = region.get(key)
            if name is not None and not isinstance(name, str):
                raise BadRequest(f"{where}: {key} must be a tag name (a string), got {type(name).__name__}")
    return regions


def _assemble(
    boxes: list[tuple[tuple[float, float, float, float], str, str, str]], points: list[_Point]
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
        Prompt(label, to_name, box, tuple(p.xy for p in extra), tuple(int(p.positive) for p in extra), from_name)
        for (box, label, to_name, from_name), extra in zip(boxes, refining)
    ]
    for label in dict.fromkeys(p.label for p in loose):  # first-seen order
        group = [p for p in loose if p.label == label]
        if any(p.positive for p in group):
            xy, signs = tuple(p.xy for p in group), tuple(int(p.positive) for p in group)
            prompts.append(Prompt(label, group[0].to_name, None, xy, signs, group[0].from_name))
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


def _label(region: Mapping[str, Any], kind: Any, where: str, known_labels: Collection[str] | None) -> str:
    names = region["value"].get(kind) if isinstance(kind, str) else None
    if not isinstance(names, list) or not names or not isinstance(names[0], str) or not names[0]:
        raise BadRequest(f"{where}: no label chosen (value.{kind} is empty); pick a label before drawing")
    label = names[0]
    if known_labels is not None and label not in known_labels:
        raise BadRequest(
            f"{where}: label {label!r} has no output label of the same name in the labeling config "
            f"(known: {', '.join(sorted(known_labels)) or 'none'})"
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
