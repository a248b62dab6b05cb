"""Decode image bytes into an (H, W, 3) uint8 RGB array, safely.

The pixel count is read from the header (PIL opens lazily) and checked against a limit before any
pixel is decoded, so a small file claiming 50000 x 50000 pixels costs nothing. EXIF orientation is
applied, so row 0 is the top of the image as the annotator sees it in Label Studio.
"""
from __future__ import annotations

import io
import logging
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backends.errors import ImageUnavailable

log = logging.getLogger(__name__)

# Modes whose samples do not fit in 8 bits: scaled to 0..255 from their own range.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def allow_pixels(max_pixels: int) -> None:
    """Raise PIL's own decompression-bomb threshold to at least `max_pixels` (never lower it: it is
    process-wide). Our explicit check in `decode_image` is the real limit; PIL's is the backstop."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_pixels:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)


def decode_image(data: bytes, max_pixels: int, name: str = "the image") -> np.ndarray:
    """Decode `data` (PNG, JPEG, TIFF, ...) into an (H, W, 3) uint8 RGB array, EXIF orientation applied.

    Any mode is converted: grey (L, I;16, I, F) is repeated into three channels, 16-bit and float
    images are scaled by their own range (not clipped), palettes expanded, alpha dropped, CMYK
    converted. Multi-frame files give their first frame. `name` appears in error messages.

    Raises ImageUnavailable when the bytes are empty, not an image, truncated or corrupt, or when
    the header claims more than `max_pixels` pixels.
    """
    if not data:
        raise ImageUnavailable(f"{name} is not a readable image: the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise _too_many_pixels(name, width, height, max_pixels)
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


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from a PIL image of any mode."""
    mode = image.mode
    if mode in _WIDE_MODES:
        grey = _scale_to_uint8(np.asarray(image))
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "P":
        # Palette transparency is only handled through RGBA (PIL warns otherwise).
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _scale_to_uint8(samples: np.ndarray) -> np.ndarray:
    """(H, W) integers or floats -> (H, W) uint8: by the maximum when all samples are >= 0 (so a dark
    12-bit image stays dark relative to its brightest pixel), else min-max; NaN becomes 0."""
    values = np.nan_to_num(samples.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low = float(values.min()) if values.size else 0.0
    high = float(values.max()) if values.size else 0.0
    if low >= 0:
        low = 0.0
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _apply_orientation(image: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
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
