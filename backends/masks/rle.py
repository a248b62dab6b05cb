"""Label Studio brush RLE: encode a mask, decode a brush region; vectorised NumPy.

Label Studio stores a brush region as `value.rle`, a list of byte values (0..255) holding a
bit-packed run-length code (thi-ng rle-pack) of the region's RGBA raster, 4 bytes per pixel,
row-major over an `original_height` x `original_width` image. Bit layout, most significant
bit first:

    header  num (32 bits, number of bytes in the raster = 4*H*W)
            word_size - 1 (5 bits)         Label Studio writes word_size = 8
            rle_sizes[k] - 1 (4 bits each, k = 0..3)   Label Studio writes (3, 4, 8, 16)
    tokens  flag (1 bit), size index k (2 bits), n (rle_sizes[k] bits), then
            flag 1: one word repeated n + 1 times
            flag 0: n + 1 literal words
    padding zero bits up to a whole byte (a whole zero byte when already aligned: the SDK does so)

The reference implementation is `label_studio_sdk.converter.brush` (pure Python, one string
character per bit). This module produces byte-identical output and accepts the same input,
working on runs and tokens with NumPy instead of bits in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from backends.errors import BadRequest

WORD_SIZE = 8
RLE_SIZES = (3, 4, 8, 16)
_HEADER_BITS = 32 + 5 + 4 * 4
# The SDK caps one repeat token at 2**16 words and splits longer runs into chunks of 2**16.
_CHUNK = 1 << 16
# A header may claim up to 2**32 - 1 words; refuse absurd sizes before allocating anything.
MAX_DECODED_WORDS = 1 << 30


# ----------------------------------------------------------------------------- encoding


def encode_rle(mask: np.ndarray) -> list[int]:
    """Encode a 2-D mask as Label Studio brush RLE.

    mask: HxW array, bool or any numeric dtype; nonzero = inside the region.
    Returns the `value.rle` list of ints (0..255).

    Exactly equal to the SDK's brush encoding of a 0/255 mask, i.e.
    `label_studio_sdk.converter.brush.mask2rle(np.where(mask != 0, 255, 0).astype(np.uint8))`
    (and to `image2rle` of a black/white PNG): every RGBA byte of an inside pixel is 255, every
    byte of an outside pixel 0, so Label Studio shows the region opaque in the label's colour.
    """
    pixels = np.asarray(mask)
    if pixels.ndim != 2:
        raise BadRequest(f"mask must be a 2-D HxW array, got shape {pixels.shape}")
    if pixels.size == 0:
        raise BadRequest(f"mask has no pixels (shape {pixels.shape})")
    flat = pixels.ravel() if pixels.dtype == bool else pixels.ravel() != 0
    # Runs of equal pixels; each pixel is 4 equal bytes, so byte runs are 4x the pixel runs.
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], starts, [flat.size]))
    lengths = np.diff(bounds) * 4
    values = np.where(flat[bounds[:-1]], 255, 0)
    return _encode_runs(lengths, values, 4 * flat.size)


def encode_rle_bytes(values: np.ndarray) -> list[int]:
    """Encode a flat uint8 raster (e.g. HxWx4 RGBA, raveled) as brush RLE.

    values: 1-D array of ints 0..255. Equal to `label_studio_sdk.converter.brush.encode_rle(values)`
    with its default word size 8 and run sizes (3, 4, 8, 16).
    """
    raster = np.asarray(values)
    if raster.ndim != 1 or raster.size == 0:
        raise BadRequest(f"raster must be a non-empty 1-D array, got shape {raster.shape}")
    if not np.issubdtype(raster.dtype, np.integer) or raster.min() < 0 or raster.max() > 255:
        raise BadRequest("raster values must be integers 0..255")
    starts = np.flatnonzero(raster[1:] != raster[:-1]) + 1
    bounds = np.concatenate(([0], starts, [raster.size]))
    return _encode_runs(np.diff(bounds), raster[bounds[:-1]].astype(np.int64), raster.size)


def _encode_runs(lengths: np.ndarray, values: np.ndarray, num: int) -> list[int]:
    """Bit-pack runs (lengths >= 1, word values 0..255) exactly as the SDK's `encode_rle` does."""
    lengths = lengths.astype(np.int64)
    values = values.astype(np.int64)
    # Runs longer than 256 use 16-bit sizes and are split into chunks of 2**16 words.
    long_run = lengths > 256
    extra_chunks = np.where(long_run, (lengths - 1) // _CHUNK, 0)
    per_run = extra_chunks + 1
    run_of_token = np.repeat(np.arange(lengths.size), per_run)
    first_token = np.cumsum(per_run) - per_run
    chunk_index = np.arange(run_of_token.size) - first_token[run_of_token]
    last_chunk = chunk_index == extra_chunks[run_of_token]
    token_len = np.where(last_chunk, lengths[run_of_token] - _CHUNK * chunk_index, _CHUNK)
    token_value = values[run_of_token]
    token_long = long_run[run_of_token]

    # Size index k and bit width of n per token, following the SDK's thresholds.
    k = np.select(
        [token_long, token_len > 16, token_len > 8],
        [3, 2, 1],
        default=0,
    )
    size_bits = np.asarray(RLE_SIZES, dtype=np.int64)[k]
    single = (token_len == 1) & ~token_long
    flag = np.where(single, 0, 1)
    n = np.where(single, 0, token_len - 1)
    code = (((flag << 2 | k) << size_bits | n) << WORD_SIZE) | token_value
    nbits = 3 + size_bits + WORD_SIZE

    header_codes = np.array([num, WORD_SIZE - 1, int("".join(f"{s - 1:04b}" for s in RLE_SIZES), 2)], dtype=np.int64)
    header_bits = np.array([32, 5, 16], dtype=np.int64)
    return _pack_bits(np.concatenate((header_codes, code)), np.concatenate((header_bits, nbits)))


def _pack_bits(codes: np.ndarray, nbits: np.ndarray) -> list[int]:
    """Concatenate codes (each < 2**32, written MSB first in nbits bits) into bytes.

    Always ends with 1..8 zero padding bits (a full zero byte when the bits end on a byte
    boundary), as the SDK does.
    """
    ends = np.cumsum(nbits)
    total = int(ends[-1])
    starts = ends - nbits
    offset = starts & 7
    # Each code lands in the 40-bit window of the 5 bytes starting at byte starts // 8.
    window = codes.astype(np.uint64) << (40 - offset - nbits).astype(np.uint64)
    first_byte = starts >> 3
    nbytes = total // 8 + 1
    out = np.zeros(nbytes + 5, dtype=np.int64)
    for b in range(5):
        part = ((window >> np.uint64(8 * (4 - b))) & np.uint64(0xFF)).astype(np.int64)
        # Codes never share a bit, so summing the bytes they touch is the same as OR-ing them.
        out += np.bincount(first_byte + b, weights=part, minlength=nbytes + 5).astype(np.int64)
    return out[:nbytes].tolist()


# ----------------------------------------------------------------------------- decoding


def decode_rle(rle: Sequence[int], height: int, width: int, threshold: int = 0) -> np.ndarray:
    """Decode a brush region into a mask.

    rle: `value.rle` of a brushlabels region; height, width: its original_height/original_width.
    Returns an HxW bool mask: True where the pixel's alpha byte (the 4th of its RGBA bytes) is
    greater than `threshold`. This is the layer the SDK keeps (`decode_from_annotation` takes
    `reshape(decode_rle(rle), [H, W, 4])[:, :, 3]`); with the default 0 a pixel is inside when
    Label Studio draws it at all (also antialiased brush edges with partial alpha).
    Raises BadRequest when the RLE is corrupt, truncated or not of size 4*height*width.
    """
    if int(height) <= 0 or int(width) <= 0:
        raise BadRequest(f"image size must be positive, got {width}x{height}")
    expected = 4 * int(height) * int(width)
    values, lengths = _decode_runs(rle, expected)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    # Pixel i's alpha is byte 4i+3: a run [s, e) holds the alpha bytes of pixels s//4 .. e//4-1.
    pixels_in_run = ends // 4 - starts // 4
    mask = np.repeat(values > threshold, pixels_in_run)
    return mask.reshape(int(height), int(width))


def decode_rle_values(rle: Sequence[int], expected_length: int | None = None) -> np.ndarray:
    """Decode brush RLE into its flat raster of words (RGBA bytes for Label Studio brushes).

    Returns a 1-D array of length `num` from the header: uint8 for word sizes up to 8 (what
    Label Studio writes; then equal to `label_studio_sdk.converter.brush.decode_rle(rle)`),
    uint16 / uint32 for wider words. Raises BadRequest when the RLE is corrupt or truncated, or
    when `expected_length` is given and the header says otherwise.
    """
    values, lengths = _decode_runs(rle, expected_length)
    word_size = _header(_as_bytes(rle))[1]  # cheap: the header is the first 8 bytes
    dtype = np.uint8 if word_size <= 8 else np.uint16 if word_size <= 16 else np.uint32
    return np.repeat(values.astype(dtype), lengths)


def _as_bytes(rle: Sequence[int]) -> np.ndarray:
    """The RLE as a uint8 array, or BadRequest when it is not a list of bytes."""
    if isinstance(rle, np.ndarray):
        if rle.ndim != 1 or (rle.size and not np.issubdtype(rle.dtype, np.integer)):
            raise BadRequest(f"RLE must be a flat list of integers, got {rle.dtype} {rle.shape}")
        if rle.size and (rle.min() < 0 or rle.max() > 255):
            raise BadRequest("RLE values must be bytes (0..255)")
        data = rle.astype(np.uint8)
    elif isinstance(rle, (list, tuple, bytes, bytearray)):
        try:
            # bytes() checks "integer in 0..255" in C, ~5x faster than np.asarray on a list.
            data = np.frombuffer(bytes(rle), dtype=np.uint8)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"RLE must be a list of integers 0..255 ({exc})") from None
    else:
        raise BadRequest(f"RLE must be a list of integers 0..255, got {type(rle).__name__}")
    if data.size * 8 < _HEADER_BITS:
        raise BadRequest(f"RLE too short: {data.size} bytes cannot hold the 57-bit header")
    return data


def _header(data: np.ndarray) -> tuple[int, int, tuple[int, ...]]:
    """(num, word_size, rle_sizes) from the first 57 bits."""
    header = int.from_bytes(data[:8].tobytes(), "big") >> (64 - _HEADER_BITS)
    num = header >> 21
    word_size = ((header >> 16) & 0x1F) + 1
    sizes = tuple(((header >> (12 - 4 * k)) & 0xF) + 1 for k in range(4))
    return num, word_size, sizes


def _read(padded: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """Read `width` (1..32) bits MSB-first at bit positions `pos` from zero-padded uint64 bytes."""
    first = pos >> 3
    window = np.zeros(pos.shape, dtype=np.uint64)
    for b in range(5):
        window = (window << np.uint64(8)) | padded[first + b]
    shift = (40 - width - (pos & 7)).astype(np.uint64)
    return ((window >> shift) & np.uint64((1 << width) - 1)).astype(np.int64)


@lru_cache(maxsize=8)
def _token_lengths(word_size: int, sizes: tuple[int, ...]) -> np.ndarray:
    """Token length in bits for every possible key (flag, size index, n: the token's first bits).

    The key is 3 + max(sizes) bits wide, so a token's length is one table look-up.
    """
    key_bits = 3 + max(sizes)
    keys = np.arange(1 << key_bits, dtype=np.int64)
    flag = keys >> (key_bits - 1)
    size_bits = np.asarray(sizes, dtype=np.int64)[(keys >> (key_bits - 3)) & 3]
    n = (keys >> (max(sizes) - size_bits)) & ((1 << size_bits) - 1)
    return 3 + size_bits + np.where(flag == 1, word_size, (n + 1) * word_size)


def _decode_runs(rle: Sequence[int], expected_length: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Decode to runs: (word values int64, run lengths int64) summing to the header's num."""
    data = _as_bytes(rle)
    num, word_size, sizes = _header(data)
    if expected_length is not None and num != expected_length:
        raise BadRequest(
            f"RLE holds {num} values but the image needs {expected_length} "
            "(4 per pixel of original_width x original_height)"
        )
    if num > MAX_DECODED_WORDS:
        raise BadRequest(f"RLE claims {num} values, more than the limit {MAX_DECODED_WORDS}")
    if num == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nbits = data.size * 8
    # Every token yields >= 1 value, so a real stream needs at most this many bits; refusing longer
    # input bounds the per-bit work arrays below (a huge bogus list must not exhaust memory).
    longest = _HEADER_BITS + num * (3 + max(sizes) + word_size) + 8
    if nbits > longest:
        raise BadRequest(f"RLE is corrupt: {data.size} bytes is more than {num} values can need")
    padded = np.concatenate((data, np.zeros(8, np.uint8))).astype(np.uint64)
    max_size = max(sizes)
    keys = _token_keys(padded, nbits, 3 + max_size)
    lengths_table = _token_lengths(word_size, sizes)
    chain = _token_chain(keys, lengths_table, nbits)

    key = keys[chain]
    flag = (key >> (max_size + 2)) == 1
    size_bits = np.asarray(sizes, dtype=np.int64)[(key >> max_size) & 3]
    n = (key >> (max_size - size_bits)) & ((1 << size_bits) - 1)
    complete = chain + lengths_table[key] <= nbits
    body = chain + 3 + size_bits

    # The SDK stops once it has written num words; what follows is padding.
    produced = np.cumsum(n + 1)
    used = int(np.searchsorted(produced, num)) + 1
    if used > produced.size or not complete[used - 1]:
        written = int(produced[complete][-1]) if complete.any() else 0
        raise BadRequest(f"RLE is truncated or corrupt: it ends after {written} of {num} values")
    flag, n, body = flag[:used], n[:used], body[:used]
    if produced[used - 1] > num and not flag[-1]:
        raise BadRequest("RLE is corrupt: literal words run past the declared size")

    if flag.all():  # what Label Studio and the SDK write: repeat tokens only
        values = _read(padded, body, word_size)
        lengths = n + 1
    else:  # literal tokens expand to n+1 words of length 1
        words = np.where(flag, 1, n + 1)
        token_of_word = np.repeat(np.arange(used), words)
        word_index = np.arange(token_of_word.size) - np.repeat(np.cumsum(words) - words, words)
        values = _read(padded, body[token_of_word] + word_index * word_size, word_size)
        lengths = np.where(flag[token_of_word], n[token_of_word] + 1, 1)
    lengths[-1] -= int(produced[used - 1]) - num  # a final repeat may overshoot; the SDK clips it
    return values, lengths


def _token_keys(padded: np.ndarray, nbits: int, key_bits: int) -> np.ndarray:
    """The `key_bits` (<= 25) bits starting at every bit position (plus a zero-padded tail)."""
    nbytes = nbits // 8 + 1
    b = padded[: nbytes + 3].astype(np.int64)
    word32 = (b[:nbytes] << 24) | (b[1 : nbytes + 1] << 16) | (b[2 : nbytes + 2] << 8) | b[3:]
    shifts = 32 - key_bits - np.arange(8)
    return ((word32[:, None] >> shifts[None, :]) & ((1 << key_bits) - 1)).ravel()


def _token_chain(keys: np.ndarray, lengths_table: np.ndarray, nbits: int) -> np.ndarray:
    """Bit positions where successive tokens start (the first one right after the header).

    A token's length depends only on its first bits, so the next token's start is computed for
    every bit position at once; the chain from the header is then followed with jumps of 8
    tokens (pointer doubling), so Python steps once per 8 tokens, never per bit or pixel.
    A token that overruns the data stays in the chain (its successor is the sentinel nbits).
    """
    jump = np.empty(nbits + 1, dtype=np.int64)
    np.minimum(np.arange(nbits) + lengths_table[keys[:nbits]], nbits, out=jump[:nbits])
    jump[nbits] = nbits
    stride: np.ndarray = jump
    for _ in range(3):
        stride = stride[stride]
    coarse = []
    position = _HEADER_BITS
    while position < nbits:
        coarse.append(position)
        position = stride[position]
    rows = np.empty((len(coarse), 8), dtype=np.int64)
    rows[:, 0] = coarse
    for step in range(1, 8):
        rows[:, step] = jump[rows[:, step - 1]]
    chain = rows.ravel()
    return chain[chain < nbits]
