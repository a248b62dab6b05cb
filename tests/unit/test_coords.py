"""Percent <-> pixel conversions of Label Studio regions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.errors import BadRequest
from backends.masks.coords import (
    percent_box_to_pixels,
    percent_point_to_pixels,
    percent_to_pixels,
    pixels_to_percent,
)


def test_box_percent_to_xyxy_pixels():
    value = {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0}
    assert percent_box_to_pixels(value, 200, 100) == (20.0, 20.0, 80.0, 60.0)


def test_box_is_clipped_to_the_image():
    value = {"x": -10, "y": 90, "width": 30, "height": 40}
    assert percent_box_to_pixels(value, 100, 100) == (0.0, 90.0, 20.0, 100.0)


def test_rotation_is_clockwise_around_the_top_left_corner():
    # 20x10 px box at (10, 10) turned 90 degrees clockwise (y down): it hangs left of x = 10.
    value = {"x": 10, "y": 10, "width": 20, "height": 10, "rotation": 90}
    x0, y0, x1, y1 = percent_box_to_pixels(value, 100, 100)
    assert (x0, y0, x1, y1) == pytest.approx((0.0, 10.0, 10.0, 30.0))


def test_rotation_45_gives_the_bounding_box_of_the_turned_rectangle():
    value = {"x": 50, "y": 10, "width": 10, "height": 10, "rotation": 45}
    x0, y0, x1, y1 = percent_box_to_pixels(value, 100, 100)
    half_diagonal = 10 / math.sqrt(2)
    assert (x0, y0, x1, y1) == pytest.approx((50 - half_diagonal, 10, 50 + half_diagonal, 10 + 2 * half_diagonal))


def test_full_turn_is_no_rotation():
    value = {"x": 10, "y": 10, "width": 20, "height": 10}
    assert percent_box_to_pixels({**value, "rotation": 360}, 100, 100) == percent_box_to_pixels(value, 100, 100)


@pytest.mark.parametrize(
    "value",
    [
        {"x": 10, "y": 10, "width": 0, "height": 5},
        {"x": 10, "y": 10, "width": 5, "height": -5},
        {"x": float("nan"), "y": 10, "width": 5, "height": 5},
        {"x": 10, "y": float("inf"), "width": 5, "height": 5},
        {"x": 10, "y": 10, "width": 5},
        {"x": "10", "y": 10, "width": 5, "height": 5},
        {"x": True, "y": 10, "width": 5, "height": 5},
        {"x": 150, "y": 10, "width": 5, "height": 5},
        {"x": -50, "y": 10, "width": 20, "height": 5},
        {"x": 10, "y": 10, "width": 5, "height": 5, "rotation": float("nan")},
    ],
    ids=[
        "zero-width",
        "negative-height",
        "nan",
        "inf",
        "missing",
        "string",
        "bool",
        "right-of-image",
        "left-of-image",
        "nan-rotation",
    ],
)
def test_bad_boxes_raise_bad_request(value):
    with pytest.raises(BadRequest):
        percent_box_to_pixels(value, 100, 100)


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (10.5, 10)])
def test_bad_image_sizes_raise_bad_request(size):
    with pytest.raises(BadRequest):
        percent_box_to_pixels({"x": 1, "y": 1, "width": 5, "height": 5}, *size)


def test_keypoint_to_pixels():
    assert percent_point_to_pixels({"x": 25, "y": 50, "width": 0.5}, 400, 300) == (100.0, 150.0)
    assert percent_point_to_pixels({"x": 100, "y": 0}, 400, 300) == (400.0, 0.0)


@pytest.mark.parametrize("value", [{"x": 101, "y": 5}, {"x": 5, "y": -0.1}, {"x": float("nan"), "y": 1}, {"y": 1}])
def test_bad_keypoints_raise_bad_request(value):
    with pytest.raises(BadRequest):
        percent_point_to_pixels(value, 100, 100)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4)), min_size=1, max_size=20),
    st.integers(1, 5000),
    st.integers(1, 5000),
)
def test_percent_pixel_round_trip(points, width, height):
    xy = np.array(points)
    percent = pixels_to_percent(xy, width, height)
    assert np.allclose(percent_to_pixels(percent, width, height), xy, atol=1e-6)
    assert np.allclose(percent[:, 0], xy[:, 0] / width * 100)
    assert np.allclose(percent[:, 1], xy[:, 1] / height * 100)


@pytest.mark.parametrize("points", [np.zeros((3, 3)), np.zeros(4), [[1, float("nan")]], [["a", "b"]]])
def test_bad_point_arrays_raise_bad_request(points):
    with pytest.raises(BadRequest):
        pixels_to_percent(points, 10, 10)
