"""Label Studio percent coordinates <-> pixel coordinates of the original image.

Conventions (used by every backend module):
- Label Studio region values (x, y, width, height, points) are PERCENT of the image's
  original_width / original_height, x to the right, y down, origin at the top-left corner.
- Pixel coordinates are continuous xy: pixel (column c, row r) covers [c, c+1) x [r, r+1) and
  its centre is (c + 0.5, r + 0.5); the image spans [0, width] x [0, height]. 0 % is x = 0 and
  100 % is x = width.
- Boxes are XYXY pixels: (x0, y0, x1, y1) with x0 < x1, y0 < y1.
- A rectangle's `rotation` is in degrees, clockwise on screen (y down), around its top-left
  corner (x, y), as Label Studio's editor (Konva) draws it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike

from backends.errors import BadRequest


def check_image_size(width: int, height: int) -> None:
    """BadRequest unless width and height are positive integers (pixels)."""
    for name, size in (("width", width), ("height", height)):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
            raise BadRequest(f"image {name} must be a positive integer, got {size!r}")


def finite_number(value: Mapping, key: str) -> float:
    """value[key] as a finite float, or BadRequest naming the key."""
    if key not in value:
        raise BadRequest(f"region value lacks '{key}'")
    number = value[key]
    if isinstance(number, bool) or not isinstance(number, (int, float, np.number)):
        raise BadRequest(f"region value '{key}' must be a number, got {number!r}")
    number = float(number)
    if not math.isfinite(number):
        raise BadRequest(f"region value '{key}' must be finite, got {number}")
    return number


def percent_box_to_pixels(value: Mapping, width: int, height: int) -> tuple[float, float, float, float]:
    """A rectangle region's value -> XYXY pixel box clipped to the image.

    value: {"x", "y", "width", "height", "rotation"?} in percent of the image size (rotation in
    degrees, see the module docstring). width, height: the original image size in pixels.
    With a rotation, returns the axis-aligned bounding box of the rotated rectangle.
    Raises BadRequest for missing/NaN/infinite numbers, zero or negative area, or a box entirely
    outside the image.
    """
    check_image_size(width, height)
    x = finite_number(value, "x") / 100.0 * width
    y = finite_number(value, "y") / 100.0 * height
    w = finite_number(value, "width") / 100.0 * width
    h = finite_number(value, "height") / 100.0 * height
    has_rotation = value.get("rotation") is not None
    rotation = finite_number(value, "rotation") if has_rotation else 0.0
    if w <= 0 or h <= 0:
        raise BadRequest(f"rectangle has no area (width {value['width']}%, height {value['height']}%)")
    corners = np.array([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]])
    if rotation % 360:
        theta = math.radians(rotation)
        cos, sin = math.cos(theta), math.sin(theta)
        # Clockwise on screen with y down is the usual rotation matrix applied to (x, y).
        corners = corners @ np.array([[cos, sin], [-sin, cos]])
    corners += (x, y)
    x0, y0 = corners.min(axis=0)
    x1, y1 = corners.max(axis=0)
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise BadRequest(
            f"rectangle ({x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}) px lies outside the {width}x{height} image"
        )
    return (
        float(max(x0, 0.0)),
        float(max(y0, 0.0)),
        float(min(x1, width)),
        float(min(y1, height)),
    )


def percent_point_to_pixels(value: Mapping, width: int, height: int) -> tuple[float, float]:
    """A keypoint region's value {"x", "y"} (percent) -> (x, y) pixels.

    Raises BadRequest for missing/NaN/infinite numbers or a point outside the image
    (0..100 % on both axes, edges included).
    """
    check_image_size(width, height)
    px = finite_number(value, "x")
    py = finite_number(value, "y")
    if not (0.0 <= px <= 100.0 and 0.0 <= py <= 100.0):
        raise BadRequest(f"keypoint ({px}%, {py}%) lies outside the image")
    return px / 100.0 * width, py / 100.0 * height


def pixels_to_percent(points: ArrayLike, width: int, height: int) -> np.ndarray:
    """(N, 2) xy pixels -> (N, 2) float64 xy percent of width / height."""
    check_image_size(width, height)
    xy = _as_points(points)
    return xy * (100.0 / np.array([width, height], dtype=np.float64))


def percent_to_pixels(points: ArrayLike, width: int, height: int) -> np.ndarray:
    """(N, 2) xy percent -> (N, 2) float64 xy pixels (no clipping)."""
    check_image_size(width, height)
    xy = _as_points(points)
    return xy * (np.array([width, height], dtype=np.float64) / 100.0)


def _as_points(points: ArrayLike) -> np.ndarray:
    try:
        xy = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadRequest("points must be numbers") from None
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise BadRequest(f"points must be an (N, 2) array of x, y; got shape {xy.shape}")
    if not np.isfinite(xy).all():
        raise BadRequest("points must be finite numbers")
    return xy
