"""Mask <-> polygons, in xy pixel coordinates (see backends.coords for the convention).

A polygon is an (N, 2) float64 array of x, y vertices (implicitly closed: the last vertex is not
repeated). Pixel (column c, row r) has its centre at (c + 0.5, r + 0.5) and is inside a polygon
when its centre is, by the even-odd rule with the half-open tie rule of PNPOLY (a centre on a
non-horizontal edge counts as left of it; horizontal edges never count). That is
`skimage.draw.polygon(y - 0.5, x - 0.5)` wherever no pixel centre lies exactly on an edge.

Holes: `mask_to_polygons` splices each hole into its component's outline through a zero-width
bridge (the same segment walked there and back), and walks holes opposite to the outline, so the
result is filled correctly by the even-odd rule (here, skimage) and the non-zero rule
(canvas / Konva in Label Studio's editor) alike.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.measure import approximate_polygon, find_contours

from backends.errors import BadRequest

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_RELATIVE_TOLERANCE = 0.05


def mask_to_polygons(mask: np.ndarray, tolerance: float = 1.0, min_area: float = 4.0) -> list[np.ndarray]:
    """One polygon per 8-connected component of the mask, holes bridged in.

    mask: HxW bool (nonzero = inside). tolerance: Douglas-Peucker simplification in pixels,
    capped at 5 % of each ring's size so small objects keep their shape (0 keeps every contour
    vertex: the unsimplified polygons rasterise back to exactly `mask`).
    min_area: components whose outline encloses less (pixels^2) are dropped, and holes smaller
    than that are filled. Returns a list of (N, 2) float64 xy pixel polygons, N >= 3, largest
    component first.
    """
    pixels = np.asarray(mask)
    if pixels.ndim != 2:
        raise BadRequest(f"mask must be a 2-D HxW array, got shape {pixels.shape}")
    labels, count = ndimage.label(pixels != 0, structure=_EIGHT_CONNECTED)
    polygons: list[tuple[float, np.ndarray]] = []
    for index, window in enumerate(ndimage.find_objects(labels), start=1):
        if window is None:
            continue
        component = np.pad(labels[window] == index, 1)
        # Contour vertices lie on pixel edges; shift crop index coordinates to image xy pixels.
        offset = np.array([window[1].start - 1 + 0.5, window[0].start - 1 + 0.5])
        rings = []
        for contour in find_contours(component.astype(np.float32), 0.5, fully_connected="high"):
            ring = _simplify(contour[:, ::-1] + offset, tolerance)
            if ring is not None:
                rings.append((_signed_area(ring), ring))
        if not rings:
            continue
        rings.sort(key=lambda item: -abs(item[0]))
        outer_area, outer = rings[0]
        if abs(outer_area) < min_area:
            continue
        if outer_area < 0:
            outer = outer[::-1]
        holes = [ring if area < 0 else ring[::-1] for area, ring in rings[1:] if abs(area) >= min_area]
        polygons.append((abs(outer_area), _bridge(outer, holes)))
    polygons.sort(key=lambda item: -item[0])
    return [polygon for _, polygon in polygons]


def polygons_to_mask(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Rasterise polygons (each (N, 2) xy pixels, N >= 3) into an HxW bool mask.

    The mask is the union of the polygons, each filled by the even-odd rule at pixel centres
    (see the module docstring), so bridged holes stay holes. Parts outside the image are cut.
    """
    if height <= 0 or width <= 0:
        raise BadRequest(f"mask size must be positive, got {width}x{height}")
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        xy = np.asarray(polygon, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] < 3:
            raise BadRequest(f"a polygon needs at least 3 (x, y) points, got shape {xy.shape}")
        if not np.isfinite(xy).all():
            raise BadRequest("polygon coordinates must be finite")
        _fill_even_odd(mask, xy)
    return mask


def _fill_even_odd(mask: np.ndarray, xy: np.ndarray) -> None:
    """OR the even-odd interior of one polygon into mask (scanlines through pixel centres)."""
    height, width = mask.shape
    start, end = xy, np.roll(xy, -1, axis=0)
    y_low = np.minimum(start[:, 1], end[:, 1])
    y_high = np.maximum(start[:, 1], end[:, 1])
    # Rows whose centre y = r + 0.5 satisfies y_low <= y < y_high (half-open: shared vertices count once).
    first_row = np.clip(np.ceil(y_low - 0.5), 0, height).astype(np.int64)
    stop_row = np.clip(np.ceil(y_high - 0.5), 0, height).astype(np.int64)
    rows_per_edge = stop_row - first_row
    if rows_per_edge.sum() == 0:
        return
    edge = np.repeat(np.arange(len(xy)), rows_per_edge)
    edge_start = np.repeat(np.cumsum(rows_per_edge) - rows_per_edge, rows_per_edge)
    row = first_row[edge] + np.arange(edge.size) - edge_start
    y = row + 0.5
    x0, y0 = start[edge, 0], start[edge, 1]
    x1, y1 = end[edge, 0], end[edge, 1]
    x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    # A crossing toggles every pixel whose centre is at or right of it.
    column = np.clip(np.ceil(x_cross - 0.5), 0, width).astype(np.int64)
    r0, r1 = int(row.min()), int(row.max()) + 1
    toggles = np.bincount((row - r0) * (width + 1) + column, minlength=(r1 - r0) * (width + 1))
    inside = (np.cumsum(toggles.reshape(r1 - r0, width + 1), axis=1) & 1).astype(bool)
    mask[r0:r1] |= inside[:, :width]


def polygon_area(polygon: np.ndarray) -> float:
    """Absolute area (pixels^2) enclosed by an (N, 2) polygon (shoelace; bridges add nothing)."""
    return abs(_signed_area(np.asarray(polygon, dtype=np.float64)))


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _simplify(closed: np.ndarray, tolerance: float) -> np.ndarray | None:
    """Douglas-Peucker on a closed contour (first == last vertex); None when < 3 vertices remain.

    The tolerance is capped at 5 % of the ring's size (square root of its area): a 1-pixel error
    would shave ~10 % off a nucleus of radius 5, while large shapes get the full tolerance.
    """
    tolerance = min(tolerance, _RELATIVE_TOLERANCE * abs(_signed_area(closed)) ** 0.5)
    if tolerance > 0:
        closed = approximate_polygon(closed, tolerance)
    ring = closed[:-1] if len(closed) > 1 and np.array_equal(closed[0], closed[-1]) else closed
    return ring if len(ring) >= 3 else None


def _bridge(outer: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
    """Splice each hole into the outline at its closest vertex pair: a zero-width cut."""
    polygon = outer
    for hole in sorted(holes, key=len, reverse=True):
        distance, nearest = cKDTree(polygon).query(hole)
        j = int(np.argmin(distance))
        i = int(nearest[j])
        # outline up to vertex i, around the hole from j back to j, back to vertex i, on.
        loop = np.concatenate((hole[j:], hole[: j + 1]))
        polygon = np.concatenate((polygon[: i + 1], loop, polygon[i:]))
    return polygon
