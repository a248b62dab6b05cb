"""Result regions: brush/polygon regions from masks, and annotations -> class-index masks."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter import brush

from backends.errors import BadRequest
from backends.label_studio.label_config import ControlTag
from backends.label_studio.regions import brush_region, polygon_regions, results_to_class_mask
from backends.masks.rle import decode_rle, encode_rle

TAG = ControlTag("tag", "BrushLabels", "image", ("Cell", "Debris"), False)
POLY_TAG = ControlTag("poly", "PolygonLabels", "image", ("Cell",), False)
H, W = 40, 60


def box_mask(r0, r1, c0, c1) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[r0:r1, c0:c1] = True
    return mask


def brush_result(mask, label, **extra) -> dict:
    return {
        "type": "brushlabels",
        "from_name": "tag",
        "to_name": "image",
        "original_width": W,
        "original_height": H,
        "value": {"format": "rle", "rle": encode_rle(mask), "brushlabels": [label]},
        **extra,
    }


def test_brush_region_shape_and_content():
    mask = box_mask(5, 20, 10, 30)
    region = brush_region(mask, "Cell", TAG, score=0.875)
    assert {
        k: region[k]
        for k in ("from_name", "to_name", "type", "original_width", "original_height", "image_rotation", "score")
    } == {
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "score": 0.875,
    }
    assert region["value"]["format"] == "rle" and region["value"]["brushlabels"] == ["Cell"]
    assert region["value"]["rle"] == brush.mask2rle(mask.astype(np.uint8) * 255)
    assert np.array_equal(decode_rle(region["value"]["rle"], H, W), mask)
    assert isinstance(region["id"], str) and len(region["id"]) >= 8
    assert "score" not in brush_region(mask, "Cell", TAG)


def test_region_ids_are_fresh():
    mask = box_mask(1, 2, 1, 2)
    assert len({brush_region(mask, "Cell", TAG)["id"] for _ in range(50)}) == 50


def test_brush_region_refuses_a_mask_that_is_not_hxw():
    with pytest.raises(BadRequest):
        brush_region(np.zeros((H, W, 3), bool), "Cell", TAG)
    with pytest.raises(BadRequest):
        brush_region(np.zeros((0, W), bool), "Cell", TAG)


def test_polygon_regions_use_percent_points_and_rasterise_back():
    mask = box_mask(5, 20, 10, 30) | box_mask(25, 35, 40, 55)
    regions = polygon_regions(mask, "Cell", POLY_TAG, score=0.5, to_name="image")
    assert len(regions) == 2
    for region in regions:
        assert region["type"] == "polygonlabels" and region["from_name"] == "poly"
        assert region["value"]["closed"] is True and region["value"]["polygonlabels"] == ["Cell"]
        points = np.array(region["value"]["points"])
        assert points.shape[1] == 2 and (points >= 0).all() and (points <= 100).all()
    class_mask, warnings = results_to_class_mask(regions, {"Cell": 1}, H, W)
    assert warnings == []
    overlap = ((class_mask == 1) & mask).sum() / ((class_mask == 1) | mask).sum()
    assert overlap >= 0.95


def test_later_regions_win_by_default():
    big, small = box_mask(0, 30, 0, 40), box_mask(10, 15, 10, 15)
    results = [brush_result(small, "Debris"), brush_result(big, "Cell")]
    class_mask, warnings = results_to_class_mask(results, {"Cell": 1, "Debris": 2}, H, W)
    assert warnings == [] and (class_mask[big] == 1).all() and (class_mask[~big] == 0).all()


def test_earlier_and_smaller_overlap_rules():
    big, small = box_mask(0, 30, 0, 40), box_mask(10, 15, 10, 15)
    label_map = {"Cell": 1, "Debris": 2}
    results = [brush_result(small, "Debris"), brush_result(big, "Cell")]
    earlier, _ = results_to_class_mask(results, label_map, H, W, overlap="earlier")
    smaller, _ = results_to_class_mask(results, label_map, H, W, overlap="smaller")
    for class_mask in (earlier, smaller):
        assert (class_mask[small] == 2).all() and (class_mask[big & ~small] == 1).all()
    # "smaller" does not depend on the order; "earlier" does.
    reversed_smaller, _ = results_to_class_mask(results[::-1], label_map, H, W, overlap="smaller")
    reversed_earlier, _ = results_to_class_mask(results[::-1], label_map, H, W, overlap="earlier")
    assert np.array_equal(reversed_smaller, smaller)
    assert (reversed_earlier[small] == 1).all()
    with pytest.raises(BadRequest):
        results_to_class_mask(results, label_map, H, W, overlap="biggest")


def test_bad_regions_are_skipped_with_warnings():
    good = brush_result(box_mask(0, 5, 0, 5), "Cell")
    corrupt = brush_result(box_mask(0, 5, 0, 5), "Cell")
    corrupt["value"]["rle"] = corrupt["value"]["rle"][:10]
    wrong_size = {**brush_result(box_mask(0, 5, 0, 5), "Cell"), "original_width": W + 1}
    unknown = brush_result(box_mask(0, 5, 0, 5), "Dog")
    empty = brush_result(np.zeros((H, W), bool), "Cell")
    no_value = {"type": "brushlabels", "original_width": W, "original_height": H}
    bad_polygon = {"type": "polygonlabels", "value": {"points": [[1, 2], [3, "x"], [5, 5]], "polygonlabels": ["Cell"]}}
    short_polygon = {"type": "polygonlabels", "value": {"points": [[1, 2]], "polygonlabels": ["Cell"]}}
    other = {"type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["Cell"]}}
    results = [good, corrupt, wrong_size, unknown, empty, no_value, bad_polygon, short_polygon, other, "junk"]
    class_mask, warnings = results_to_class_mask(results, {"Cell": 3}, H, W)
    assert class_mask.dtype == np.uint8 and class_mask.shape == (H, W)
    assert (class_mask[:5, :5] == 3).all() and class_mask.sum() == 3 * 25
    assert len(warnings) == 8  # the rectangle is not a segmentation region: ignored silently
    joined = "\n".join(warnings)
    for fragment in ("truncated", f"{W + 1}x{H}", "Dog", "empty", "no value", "fewer than 3", "not an object"):
        assert fragment in joined
    assert all("rle" not in warning.lower() or len(warning) < 200 for warning in warnings)


def test_polygon_regions_rasterise_at_the_requested_size():
    # Percent points do not depend on original_width/height.
    square = {
        "type": "polygonlabels",
        "value": {"points": [[0, 0], [50, 0], [50, 50], [0, 50]], "polygonlabels": ["Cell"]},
    }
    class_mask, warnings = results_to_class_mask([square], {"Cell": 1}, 20, 10)
    assert warnings == [] and class_mask.sum() == 5 * 10


@pytest.mark.parametrize("label_map", [{"Cell": 0}, {"Cell": 256}, {"Cell": "1"}])
def test_invalid_label_maps_raise(label_map):
    with pytest.raises(BadRequest):
        results_to_class_mask([], label_map, H, W)
