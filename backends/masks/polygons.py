"""Mask <-> polygons, in xy pixel coordinates (see backends.masks.coords for the convention).

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

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.measure import approximate_polygon, find_contours

from backends.errors import BadRequest

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_RELATIVE_TOLERANCE = 0.05
DEFAULT_MAX_VERTICES = 10_000
# Scratch arrays per scanline band hold at most this many elements (crossings or toggle cells):
# a few MB whatever the polygon, so memory is the mask plus a constant.
_BAND_ELEMENTS = 1 << 18
# Scanline work is (edges x rows each crosses): a zig-zag of N vertices on an image H rows tall
# costs N x H. Allow each of max_vertices edges to cross this many rows (10,000 x 4096: ~1 s).
_ROWS_PER_EDGE_BUDGET = 4096
# Beyond this, pixel positions are meaningless in float64 and products can overflow to inf/NaN.
_MAX_COORDINATE = 1e12


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


def polygons_to_mask(
    polygons: Sequence[np.ndarray], height: int, width: int, max_vertices: int = DEFAULT_MAX_VERTICES
) -> np.ndarray:
    """Rasterise polygons (each (N, 2) xy pixels, 3 <= N <= max_vertices) into an HxW bool mask.

    The mask is the union of the polygons, each filled by the even-odd rule at pixel centres
    (see the module docstring), so bridged holes stay holes. Parts outside the image are cut.
    Memory: the HxW mask plus a bounded scratch space, whatever the vertex count.
    """
    if height <= 0 or width <= 0:
        raise BadRequest(f"mask size must be positive, got {width}x{height}")
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        crop, (row, column) = polygon_to_crop(polygon, height, width, max_vertices)
        mask[row : row + crop.shape[0], column : column + crop.shape[1]] |= crop
    return mask


def polygon_to_crop(
    polygon: np.ndarray, height: int, width: int, max_vertices: int = DEFAULT_MAX_VERTICES
) -> tuple[np.ndarray, tuple[int, int]]:
    """Rasterise one polygon into its bounding box within the HxW image.

    Returns (crop, (row, column)): an hxw bool array (h, w >= 0) covering rows row..row+h and
    columns column..column+w of the image; pixels outside it are outside the polygon.
    """
    xy = check_polygon(polygon, max_vertices)
    first_row, stop_row = _centres_between(xy[:, 1], height)
    first_column, stop_column = _centres_between(xy[:, 0], width)
    crop = np.zeros((max(stop_row - first_row, 0), max(stop_column - first_column, 0)), dtype=bool)
    if crop.size:
        _fill_even_odd(crop, (first_row, first_column), xy, max_vertices * _ROWS_PER_EDGE_BUDGET)
    return crop, (first_row, first_column)


def check_polygon(polygon: np.ndarray, max_vertices: int = DEFAULT_MAX_VERTICES) -> np.ndarray:
    """The polygon as an (N, 2) float64 array, or BadRequest: 3 <= N <= max_vertices, finite."""
    check_vertex_count(len(polygon), max_vertices)
    try:
        xy = np.asarray(polygon, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadRequest("polygon points must be numbers") from None
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] < 3:
        raise BadRequest(f"a polygon needs at least 3 (x, y) points, got shape {xy.shape}")
    if not np.isfinite(xy).all():
        raise BadRequest("polygon coordinates must be finite")
    if np.abs(xy).max() > _MAX_COORDINATE:
        raise BadRequest(f"polygon coordinates must lie within +-{_MAX_COORDINATE:g} pixels")
    return xy


def check_vertex_count(vertices: int, max_vertices: int = DEFAULT_MAX_VERTICES) -> None:
    """BadRequest naming the setting when a polygon has more than max_vertices vertices."""
    if vertices > max_vertices:
        raise BadRequest(
            f"a polygon has {vertices} vertices, more than the {max_vertices} allowed (setting POLYGON_MAX_VERTICES)"
        )


def _centres_between(values: np.ndarray, size: int) -> tuple[int, int]:
    """Pixels i in [first, stop) (rows or columns) whose centre i + 0.5 lies in [min, max) of
    `values`, clipped to 0..size: the only ones the polygon can cover."""
    first = int(np.clip(np.ceil(values.min() - 0.5), 0, size))
    stop = int(np.clip(np.ceil(values.max() - 0.5), 0, size))
    return first, stop


def _fill_even_odd(crop: np.ndarray, origin: tuple[int, int], xy: np.ndarray, max_crossings: int) -> None:
    """OR the even-odd interior of one polygon into crop (scanlines through pixel centres).

    crop: the hxw window of the image starting at origin = (row, column); xy: the polygon in
    image pixels (not shifted, so every crossing is computed exactly as on the whole image).
    BadRequest before any work when the edges cross more than max_crossings rows in total.
    Works in bands of rows so that scratch arrays stay under _BAND_ELEMENTS elements: a
    polygon whose edges cross many rows (a zig-zag) costs time, not memory.
    """
    start, end = xy, np.roll(xy, -1, axis=0)
    y_low = np.minimum(start[:, 1], end[:, 1])
    y_high = np.maximum(start[:, 1], end[:, 1])
    # Rows whose centre y = r + 0.5 satisfies y_low <= y < y_high (half-open: shared vertices count once).
    first_row = np.clip(np.ceil(y_low - 0.5) - origin[0], 0, crop.shape[0]).astype(np.int64)
    stop_row = np.clip(np.ceil(y_high - 0.5) - origin[0], 0, crop.shape[0]).astype(np.int64)
    crossing = stop_row > first_row
    if not crossing.any():
        return
    edges = _Edges(start[crossing], end[crossing], first_row[crossing], stop_row[crossing])
    crossings = int((edges.stop - edges.first).sum())
    if crossings > max_crossings:
        raise BadRequest(
            f"a polygon's edges cross {crossings} pixel rows in total, more than the {max_crossings} "
            f"allowed ({_ROWS_PER_EDGE_BUDGET} per vertex of setting POLYGON_MAX_VERTICES): simplify it"
        )
    width = crop.shape[1]
    band = max(1, min(_BAND_ELEMENTS // len(edges.x0), _BAND_ELEMENTS // (width + 1)))
    for band_start in range(int(edges.first.min()), int(edges.stop.max()), band):
        band_stop = min(band_start + band, crop.shape[0])
        crop[band_start:band_stop] |= edges.band_parity(band_start, band_stop, origin, width)


class _Edges:
    """Polygon edges that cross at least one row of the crop, as flat per-edge arrays."""

    def __init__(self, start: np.ndarray, end: np.ndarray, first: np.ndarray, stop: np.ndarray):
        self.x0, self.y0 = start[:, 0].copy(), start[:, 1].copy()
        self.dx, self.dy = end[:, 0] - start[:, 0], end[:, 1] - start[:, 1]
        self.first, self.stop = first, stop  # crop rows crossed: first <= r < stop

    def band_parity(self, band_start: int, band_stop: int, origin: tuple[int, int], width: int) -> np.ndarray:
        """(band_stop - band_start) x width bool: inside-ness of those crop rows' pixels."""
        low = np.maximum(self.first, band_start)
        high = np.minimum(self.stop, band_stop)
        active = np.flatnonzero(high > low)
        rows_per_edge = high[active] - low[active]
        edge = np.repeat(active, rows_per_edge)
        # Row of each crossing, relative to the band: counts up from low - band_start per edge.
        skip = np.cumsum(rows_per_edge) - rows_per_edge - (low[active] - band_start)
        row = np.arange(edge.size) - np.repeat(skip, rows_per_edge)
        y = row + (band_start + origin[0] + 0.5)
        x_cross = self.x0[edge] + (y - self.y0[edge]) * self.dx[edge] / self.dy[edge]
        # A crossing toggles every pixel whose centre is at or right of it.
        column = np.clip(np.ceil(x_cross - 0.5) - origin[1], 0, width).astype(np.int64)
        rows = band_stop - band_start
        toggles = np.bincount(row * (width + 1) + column, minlength=rows * (width + 1))
        parity = np.bitwise_xor.accumulate((toggles & 1).astype(np.uint8).reshape(rows, width + 1), axis=1)
        return parity[:, :width].astype(bool)


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
