"""Images for tests, built in memory: well-formed, hostile, and synthetic cells with their truth.

Pixels are (H, W, 3) uint8 RGB, row 0 at the top; masks are (H, W) bool.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels))


def quadrant_rgb(height: int = 40, width: int = 60) -> np.ndarray:
    """(H, W, 3) uint8: red top-left quadrant, green top-right, blue bottom-left, white bottom-right,
    so orientation mistakes are visible."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    h, w = height // 2, width // 2
    pixels[:h, :w] = (255, 0, 0)
    pixels[:h, w:] = (0, 255, 0)
    pixels[h:, :w] = (0, 0, 255)
    pixels[h:, w:] = (255, 255, 255)
    return pixels


def noisy_rgb(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    """Random pixels: compress badly, so truncation always cuts into the pixel data."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def cells(
    seed: int, size: tuple[int, int] = (96, 96), disks: int = 4, margin: int = 12, radii: tuple[int, int] = (6, 11)
) -> tuple[np.ndarray, np.ndarray]:
    """(image, truth) of `size` (height, width): `disks` bright disks (centres at least `margin` px
    from the border, radius in [radii[0], radii[1]) px) on a noisy dark background; the same for
    the same arguments."""
    rng = np.random.default_rng(seed)
    height, width = size
    image = rng.integers(0, 50, (height, width, 3)).astype(np.uint8)
    truth = np.zeros((height, width), bool)
    rows, cols = np.ogrid[:height, :width]
    for _ in range(disks):
        cy, cx = rng.integers(margin, height - margin), rng.integers(margin, width - margin)
        r = rng.integers(*radii)
        truth |= (rows - cy) ** 2 + (cols - cx) ** 2 < r * r
    image[truth] = (220, 200, 210)
    return image, truth


def jpeg_with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    """A JPEG storing `pixels` as they are, with EXIF Orientation `orientation` (6: display rotated
    90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB pixels, with a tiny IDAT holding almost none of them
    (a 'bomb' header: a few hundred bytes that would decode to gigabytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def truncated(data: bytes, fraction: float = 0.5) -> bytes:
    return data[: max(1, int(len(data) * fraction))]
