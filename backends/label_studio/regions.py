"""Label Studio result regions <-> masks (pure).

Masks are HxW bool (or HxW uint8 class-index) arrays of the original image, height = rows =
original_height, width = columns = original_width. Polygon points in regions are percent of
original_width / original_height (see backends.masks.coords).
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Mapping, Sequence

import numpy as np

from backends.errors import BackendError, BadRequest
from backends.label_studio.label_config import BRUSH_TYPES, ControlTag
from backends.masks.coords import check_image_size, percent_to_pixels, pixels_to_percent
from backends.masks.polygons import DEFAULT_MAX_VERTICES, check_vertex_count, mask_to_polygons, polygon_to_crop
from backends.masks.rle import decode_rle, encode_rle

OVERLAP_RULES = ("later", "earlier", "smaller")
_ID_ALPHABET = string.ascii_letters + string.digits


def region_id() -> str:
    """A fresh 10-character region id, like the ones Label Studio's editor makes."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


def brush_region(
    mask: np.ndarray,
    label: str,
    tag: ControlTag,
    score: float | None = None,
    to_name: str | None = None,
) -> dict:
    """A `brushlabels` result region for an HxW bool mask of the original image.

    original_width / original_height are the mask's W / H. to_name: the Image tag the region is
    on (default: the tag's first toName).
    """
    height, width = _mask_size(mask)
    region = _region_base(tag, "brushlabels", width, height, to_name)
    region["value"] = {"format": "rle", "rle": encode_rle(mask), "brushlabels": [label]}
    if score is not None:
        region["score"] = float(score)
    return region


def polygon_regions(
    mask: np.ndarray,
    label: str,
    tag: ControlTag,
    score: float | None = None,
    tolerance: float = 1.0,
    to_name: str | None = None,
) -> list[dict]:
    """`polygonlabels` regions for an HxW bool mask: one per connected component, holes bridged.

    Points are [x%, y%] of the mask's W / H (see backends.masks.polygons for the outline geometry).
    """
    height, width = _mask_size(mask)
    regions = []
    for polygon in mask_to_polygons(mask, tolerance=tolerance):
        region = _region_base(tag, "polygonlabels", width, height, to_name)
        region["value"] = {
            "points": pixels_to_percent(polygon, width, height).tolist(),
            "polygonlabels": [label],
            "closed": True,
        }
        if score is not None:
            region["score"] = float(score)
        regions.append(region)
    return regions


def mask_regions(
    mask: np.ndarray,
    label: str,
    tag: ControlTag,
    score: float | None = None,
    to_name: str | None = None,
    tolerance: float = 1.0,
    first_id: str | None = None,
) -> list[dict]:
    """The result regions of an HxW bool mask in `tag`'s kind: one `brushlabels` region for a brush
    tag, `polygonlabels` regions (one per component, simplified within `tolerance` pixels) for a
    polygon tag. `first_id`: the id of the (first) region, e.g. to replace an earlier answer in place.

    An unlabelled Brush / Polygon tool takes its labels from a Labels tag: each region is then the
    pair Label Studio's editor itself saves for such a region, with one id: the tool's result
    (`brush` {format, rle} / `polygon` {points, closed}) and the Labels tag's (`labels`, the same
    value plus `labels`).
    """
    if tag.type in BRUSH_TYPES:
        regions = [brush_region(mask, label, tag, score, to_name=to_name)]
    else:
        regions = polygon_regions(mask, label, tag, score, tolerance=tolerance, to_name=to_name)
    if regions and first_id:
        regions[0]["id"] = first_id
    labels_tag = tag.labels_tag(label)
    if labels_tag is None:
        return regions
    return [twin for region in regions for twin in _tool_and_labels_results(region, tag, labels_tag)]


def _tool_and_labels_results(region: dict, tag: ControlTag, labels_tag: str) -> list[dict]:
    """A `brushlabels` / `polygonlabels` region -> the unlabelled tool's result and the Labels tag's."""
    kind = str(region["type"])
    value = {key: item for key, item in region["value"].items() if key != kind}
    tool = {**region, "type": tag.type.lower(), "value": value}
    labels = {**region, "from_name": labels_tag, "type": "labels", "value": {**value, "labels": region["value"][kind]}}
    return [tool, labels]


def results_to_class_mask(
    results: Sequence[Mapping],
    label_map: Mapping[str, int],
    height: int,
    width: int,
    overlap: str = "later",
    max_polygon_vertices: int = DEFAULT_MAX_VERTICES,
) -> tuple[np.ndarray, list[str]]:
    """Rasterise brushlabels and polygonlabels regions into an HxW uint8 class-index mask.

    label_map: label -> class index (1..255); 0 is background. Other result types (rectangles,
    choices, ...) are ignored. Where regions overlap:
      "later"   the region later in `results` wins (what the annotator drew last is on top);
      "earlier" the region earlier in `results` wins;
      "smaller" the smaller region (fewer pixels) wins, so small objects drawn over large ones
                survive; equal sizes fall back to "later".
    A bad region is skipped, never raised: returns (mask, warnings), one human-readable warning
    per skipped region (unknown label, corrupt RLE, size mismatch, empty region, a polygon over
    max_polygon_vertices vertices, ...). Memory: the class mask plus one region's mask at a time.
    """
    if overlap not in OVERLAP_RULES:
        raise BadRequest(f"overlap must be one of {', '.join(OVERLAP_RULES)}, got {overlap!r}")
    check_image_size(width, height)
    for label, index in label_map.items():
        is_int = isinstance(index, (int, np.integer)) and not isinstance(index, bool)
        if not is_int or not 1 <= index <= 255:
            raise BadRequest(f"label_map['{label}'] must be a class index 1..255, got {index!r}")
    warnings: list[str] = []
    class_mask = np.zeros((height, width), dtype=np.uint8)
    sized: list[tuple[int, int, int, Mapping]] = []  # "smaller": area, order, class, region
    for order, index, region, crop, origin in _usable_regions(
        results, label_map, height, width, max_polygon_vertices, warnings
    ):
        if overlap == "smaller":
            sized.append((int(crop.sum()), order, index, region))  # painted below, largest first
        else:
            _paint(class_mask, crop, origin, index, over=overlap == "later")
    # Rasterise again rather than hold every region's mask: memory stays one region's worth.
    for _, _, index, region in sorted(sized, key=lambda item: (-item[0], item[1])):
        crop, origin = _region_crop(
            region, region["value"], str(region["type"]).lower(), height, width, max_polygon_vertices
        )
        _paint(class_mask, crop, origin, index, over=True)
    return class_mask, warnings


def _usable_regions(results, label_map, height, width, max_polygon_vertices, warnings):
    """Yield (order, class index, region, crop, origin) per usable segmentation region.

    Appends one warning per skipped region to `warnings`.
    """
    for order, region in enumerate(results):
        if not isinstance(region, Mapping):
            warnings.append(f"region {order}: not an object, skipped")
            continue
        kind = str(region.get("type", "")).lower()
        value = region.get("value")
        labels_key = kind
        if kind == "labels" and isinstance(value, Mapping):
            # a Labels tag's result next to an unlabelled Brush / Polygon tool: same value plus labels
            labels_key, kind = "labels", _labelled_shape(value)
        if kind not in ("brushlabels", "polygonlabels"):
            continue
        name = f"region {order} ({kind}, id {region.get('id', '?')})"
        if not isinstance(value, Mapping):
            warnings.append(f"{name}: no value, skipped")
            continue
        labels = value.get(labels_key) or []
        if not isinstance(labels, list):
            labels = []
        known = [label for label in labels if isinstance(label, str) and label in label_map]
        if not known:
            warnings.append(f"{name}: label {labels!r} is not in the label map, skipped")
            continue
        try:
            crop, origin = _region_crop(region, value, kind, height, width, max_polygon_vertices)
        except BackendError as exc:
            warnings.append(f"{name}: {exc.message}, skipped")
            continue
        if not crop.any():
            warnings.append(f"{name}: empty region, skipped")
            continue
        yield order, int(label_map[known[0]]), region, crop, origin


def _labelled_shape(value: Mapping) -> str:
    """The kind of mask a `labels` result's value holds: its tool's twin carries no labels, so the
    labels result is the one read (rectangles, keypoints and other Labels uses are not masks)."""
    if "rle" in value:
        return "brushlabels"
    if "points" in value and "x" not in value:
        return "polygonlabels"
    return ""


def _paint(class_mask: np.ndarray, crop: np.ndarray, origin: tuple[int, int], index: int, over: bool) -> None:
    """Set class_mask to index where crop is True (over: also over pixels already painted)."""
    row, column = origin
    window = class_mask[row : row + crop.shape[0], column : column + crop.shape[1]]
    window[crop if over else crop & (window == 0)] = index


def _region_crop(
    region: Mapping, value: Mapping, kind: str, height: int, width: int, max_polygon_vertices: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """The region's bool mask over a window of the image: (crop, (row, column) of its corner)."""
    if kind == "brushlabels":
        if value.get("format", "rle") != "rle" or "rle" not in value:
            raise BadRequest("brush region has no RLE")
        size = (region.get("original_width"), region.get("original_height"))
        if size != (width, height):
            raise BadRequest(f"brush region is {size[0]}x{size[1]}, the image is {width}x{height}")
        return decode_rle(value["rle"], height, width), (0, 0)
    points = value.get("points")
    if not isinstance(points, (list, tuple)) or len(points) < 3:
        raise BadRequest("polygon region has fewer than 3 points")
    check_vertex_count(len(points), max_polygon_vertices)  # before converting a huge list
    # Percent coordinates do not depend on original_width/height: rasterise at the image size.
    xy = percent_to_pixels(points, width, height)
    return polygon_to_crop(xy, height, width, max_polygon_vertices)


def _mask_size(mask: np.ndarray) -> tuple[int, int]:
    """(height, width) of an HxW mask; BadRequest for any other shape or an empty side."""
    shape = np.shape(mask)
    if len(shape) != 2:
        raise BadRequest(f"a mask must be HxW (height, width), got shape {shape}")
    height, width = int(shape[0]), int(shape[1])
    check_image_size(width, height)
    return height, width


def _region_base(tag: ControlTag, kind: str, width: int, height: int, to_name: str | None) -> dict:
    """The fields every result region has; regions are drawn on the unrotated image."""
    return {
        "id": region_id(),
        "from_name": tag.name,
        "to_name": to_name or tag.to_name,
        "type": kind,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
    }
