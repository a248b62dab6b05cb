"""Decode image bytes into an (H, W, 3) uint8 RGB array, safely.

The cost of decoding is bounded before any pixel is decoded: the pixel count is read from the
header (PIL opens lazily), so a small file claiming 50000 x 50000 pixels costs nothing, and a JPEG's
scans are counted from its markers (`count_jpeg_scans`), since every scan of a progressive JPEG
costs a pass over the whole image. Memory stays near the output's own size: 16-bit and float
samples are scaled to 8 bits a block of rows at a time. EXIF orientation is applied, so row 0 is
the top of the image as the annotator sees it in Label Studio.
"""

from __future__ import annotations

import io
import logging
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backends.errors import ImageUnavailable

log = logging.getLogger(__name__)

# Modes whose samples do not fit in 8 bits: scaled to 0..255 from their own range.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}

# Normal encoders write 1 (baseline) to about 12 (progressive) scans; each scan of a progressive
# JPEG costs a pass over every block of the image, so 1,500 repeated scans of 16 MP cost ~28 s.
DEFAULT_MAX_JPEG_SCANS = 100
# Marker segments walked in Python before a JPEG is called malformed (real files have < 100).
MAX_JPEG_SEGMENTS = 10_000
# Pixels converted to RGB (16-bit and float ones scaled to 8 bits) this many at a time. Small
# blocks: temporaries of several MB stay in glibc's per-thread arenas after use.
_BLOCK_SAMPLES = 1 << 18


def allow_pixels(max_pixels: int) -> None:
    """Raise PIL's own decompression-bomb threshold to at least `max_pixels` (never lower it: it is
    process-wide). Our explicit check in `decode_image` is the real limit; PIL's is the backstop."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_pixels:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)


def decode_image(
    data: bytes, max_pixels: int, name: str = "the image", max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS
) -> np.ndarray:
    """Decode `data` (PNG, JPEG, TIFF, ...) into an (H, W, 3) uint8 RGB array, EXIF orientation applied.

    Any mode is converted: grey (L, I;16, I, F) is repeated into three channels, 16-bit and float
    images are scaled by their own range (not clipped), palettes expanded, alpha dropped, CMYK
    converted. Multi-frame files give their first frame. `name` appears in error messages.

    Raises ImageUnavailable when the bytes are empty, not an image, truncated or corrupt, when
    the header claims more than `max_pixels` pixels, or when a JPEG has more than
    `max_jpeg_scans` scans (IMAGE_MAX_JPEG_SCANS).
    """
    if not data:
        raise ImageUnavailable(f"{name} is not a readable image: the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise _too_many_pixels(name, width, height, max_pixels)
            check_jpeg_scans(data, max_jpeg_scans, name)
            image.load()
    except ImageUnavailable:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageUnavailable(f"{name} is too large to decode: {exc}") from None
    except UnidentifiedImageError:
        raise ImageUnavailable(f"{name} is not a readable image: {_describe_non_image(data)}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ImageUnavailable(f"{name} is not a readable image: {exc or type(exc).__name__}") from None
    image = _apply_orientation(image, name)
    try:
        return to_rgb_array(image)
    except (OSError, ValueError) as exc:
        raise ImageUnavailable(f"{name} has an unsupported pixel mode {image.mode!r}: {exc}") from None


def header_pixels(data: bytes) -> int:
    """Width x height from the image header (nothing decoded); 0 when PIL cannot read the header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                return int(width) * int(height)
    except Exception:  # decode_image reports what is wrong with the file
        return 0


# -- JPEG scan count ----------------------------------------------------------------------------

# Markers without a length field: TEM and RST0..7.
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_SOS, _EOI = 0xDA, 0xD9
# The next marker, as libjpeg finds it: any bytes, 0xFF (fill bytes included), then a byte that is
# neither 0x00 (a stuffed zero) nor 0xFF. Inside a scan's entropy-coded data RSTn markers also
# belong to the scan. (No quantifier: the search stays linear on long runs of 0xFF.)
_NEXT_MARKER = re.compile(rb"\xff([^\x00\xff])")
_END_OF_SCAN = re.compile(rb"\xff([^\x00\xff\xd0-\xd7])")


def count_jpeg_scans(data: bytes, stop_after: int) -> int:
    """Start-of-scan markers of the first image in a JPEG stream (up to its EOI), walking the
    marker segments by their lengths and skipping entropy-coded data; counting stops once it
    passes `stop_after`. 0 for data that does not start with a JPEG SOI.

    Raises ImageUnavailable when the file has more than MAX_JPEG_SEGMENTS marker segments.
    """
    if not data.startswith(b"\xff\xd8"):
        return 0
    scans, segments, position = 0, 0, 2
    while scans <= stop_after:
        found = _NEXT_MARKER.search(data, position)
        if found is None or found.end() + 2 > len(data):
            break
        marker, position = found.group(1)[0], found.end()
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise ImageUnavailable(f"the JPEG has more than {MAX_JPEG_SEGMENTS} marker segments (a malformed file)")
        if marker == _EOI:
            break
        if marker in _STANDALONE_MARKERS:
            continue
        position += int.from_bytes(data[position : position + 2], "big")
        if marker == _SOS:
            scans += 1
            end = _END_OF_SCAN.search(data, position)
            if end is None:
                break
            position = end.start()
    return scans


def check_jpeg_scans(data: bytes, max_scans: int, name: str = "the image") -> None:
    """Raise ImageUnavailable when `data` is a JPEG with more than `max_scans` scans."""
    try:
        scans = count_jpeg_scans(data, max_scans)
    except ImageUnavailable as error:
        raise ImageUnavailable(f"{name} is not a readable image: {error.message}") from None
    if scans > max_scans:
        raise ImageUnavailable(
            f"{name} is a JPEG with more than {max_scans} scans, the limit (IMAGE_MAX_JPEG_SCANS): "
            "each scan costs a pass over the whole image; normal JPEGs have at most about 12"
        )


# -- pixel modes --------------------------------------------------------------------------------


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from a PIL image of any mode.

    Converted a block of rows at a time into the output, so memory is the decoded image plus the
    output plus one block (`np.asarray` of a whole image goes through `tobytes()`, which holds the
    bytes twice over, and a whole-image `convert` holds a second decoded image).
    """
    if image.mode in _WIDE_MODES:
        return _wide_to_rgb(image)
    width, height = image.size
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    for top, bottom in _row_blocks(width, height):
        rgb[top:bottom] = np.asarray(_as_rgb(image.crop((0, top, width, bottom))), dtype=np.uint8)
    return rgb


def _as_rgb(image: Image.Image) -> Image.Image:
    """Palettes expanded, alpha dropped, CMYK / grey / other modes converted (pixel by pixel)."""
    if image.mode == "P":
        # Palette transparency is only handled through RGBA (PIL warns otherwise).
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _row_blocks(width: int, height: int) -> list[tuple[int, int]]:
    """(top, bottom) of consecutive blocks of rows of about _BLOCK_SAMPLES pixels."""
    rows = max(1, _BLOCK_SAMPLES // max(width, 1))
    return [(top, min(height, top + rows)) for top in range(0, height, rows)] if width else []


def _wide_to_rgb(image: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit or float grey PIL image -> (H, W, 3) uint8, scaled as `_scale_block` says.

    Works on blocks of rows (about _BLOCK_SAMPLES samples): memory is the output plus one block,
    never a float64 copy of the whole image (which cost 8 bytes per pixel, several times over).
    """
    width, height = image.size
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    blocks = _row_blocks(width, height)
    if not blocks:
        return rgb
    ranges = [_value_range(_rows(image, top, bottom)) for top, bottom in blocks]
    low = min(min(block_low for block_low, _ in ranges), 0.0)  # all >= 0: scale by the maximum
    high = max(block_high for _, block_high in ranges)
    for top, bottom in blocks:
        rgb[top:bottom] = _scale_block(_rows(image, top, bottom), low, high)[:, :, None]
    return rgb


def _rows(image: Image.Image, top: int, bottom: int) -> np.ndarray:
    """Rows top..bottom of a one-band PIL image as a (rows, W) float64 array, non-finite values as 0."""
    width = image.size[0]
    samples = np.asarray(image.crop((0, top, width, bottom)), dtype=np.float64)
    return np.nan_to_num(samples, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def _value_range(values: np.ndarray) -> tuple[float, float]:
    return float(values.min()), float(values.max())


def _scale_block(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """float64 samples -> uint8, (value - low) * 255 / (high - low) rounded; all 0 when high <= low.
    `low` is the minimum of the whole image, or 0 when every sample is >= 0."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    values -= low
    values *= 255.0 / (high - low)
    return np.round(values, out=values).astype(np.uint8)


def _apply_orientation(image: Image.Image, name: str) -> Image.Image:
    """`image` turned as its EXIF Orientation says, in place (no copy when there is nothing to turn)."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # broken EXIF must not make a readable image unusable
        log.warning("%s: ignoring unreadable EXIF orientation: %s", name, exc)
    return image


def _too_many_pixels(name: str, width: int, height: int, max_pixels: int) -> ImageUnavailable:
    return ImageUnavailable(
        f"{name} is too large: {width} x {height} = {width * height / 1e6:.1f} megapixels, more than the "
        f"limit of {max_pixels / 1e6:.1f} (IMAGE_MAX_MEGAPIXELS)"
    )


def _describe_non_image(data: bytes) -> str:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "got an HTML page instead of an image (a login page or an error page?)"
    if head.startswith((b"{", b"[")):
        return "got JSON instead of an image (an API error?)"
    return f"unknown format ({len(data)} bytes starting with {data[:8].hex()})"
