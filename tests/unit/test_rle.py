"""Brush RLE against label_studio_sdk.converter.brush: byte-identical, and bad input -> BadRequest."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from label_studio_sdk.converter import brush

from backends.errors import BadRequest
from backends.masks.rle import decode_rle, decode_rle_values, encode_rle, encode_rle_bytes

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sdk_rle(mask: np.ndarray) -> list[int]:
    return brush.mask2rle(np.where(mask, 255, 0).astype(np.uint8))


def assert_matches_sdk(mask: np.ndarray) -> None:
    ours = encode_rle(mask)
    reference = sdk_rle(mask)
    assert ours == reference
    assert np.array_equal(decode_rle(reference, *mask.shape), mask)
    assert np.array_equal(decode_rle_values(reference), brush.decode_rle(reference))


@st.composite
def masks(draw, max_side: int = 48) -> np.ndarray:
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    style = draw(st.sampled_from(["random", "runs"]))
    if style == "random":
        return draw(arrays(bool, (height, width)))
    # Long horizontal runs: what real masks look like.
    flat = np.zeros(height * width, dtype=bool)
    cuts = sorted(draw(st.lists(st.integers(0, flat.size), max_size=8)))
    for start, stop in zip(cuts[::2], cuts[1::2], strict=False):  # an odd last cut is dropped
        flat[start:stop] = True
    return flat.reshape(height, width)


@SETTINGS
@given(masks())
def test_random_masks_match_the_sdk_both_ways(mask):
    assert_matches_sdk(mask)


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((1, 1), bool),
        np.ones((1, 1), bool),
        np.zeros((64, 64), bool),
        np.ones((64, 64), bool),
        np.ones((1, 1000), bool),
        np.ones((1000, 1), bool),
        np.indices((33, 47)).sum(axis=0) % 2 == 0,  # checkerboard: one run per pixel
        np.pad(np.ones((1, 1), bool), ((20, 19), (7, 30))),  # single pixel
    ],
    ids=["1x1-empty", "1x1-full", "empty", "full", "1x1000", "1000x1", "checkerboard", "single-pixel"],
)
def test_adversarial_masks_match_the_sdk(mask):
    assert_matches_sdk(mask)


@pytest.mark.parametrize("run_pixels", [1, 2, 3, 4, 63, 64, 65, 16383, 16384, 16385, 32768, 40000, 70001])
def test_run_lengths_around_the_format_limits_match_the_sdk(run_pixels):
    # A run of n pixels is 4n bytes: thresholds at 8, 16, 256 bytes and chunks of 2**16 bytes.
    mask = np.zeros((1, run_pixels + 7), dtype=bool)
    mask[0, 3 : 3 + run_pixels] = True
    assert_matches_sdk(mask)
    assert_matches_sdk(~mask)


def test_uint8_masks_count_nonzero_as_inside():
    mask = np.array([[0, 1, 255], [7, 0, 0]], dtype=np.uint8)
    assert encode_rle(mask) == sdk_rle(mask != 0)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(1, 300)), min_size=1, max_size=40))
def test_raster_encoder_matches_the_sdk_including_single_values(runs):
    raster = np.repeat([value for value, _ in runs], [length for _, length in runs]).astype(np.uint8)
    reference = brush.encode_rle(raster)
    assert encode_rle_bytes(raster) == reference
    assert np.array_equal(decode_rle_values(reference), raster)


# A token writer independent of the SDK's encoder, to produce literal tokens, other word sizes and
# run sizes, which Label Studio's editor (thi-ng rle-pack) may write but the SDK encoder never does.
def write_stream(num, word_size, sizes, tokens) -> list[int]:
    bits = f"{num:032b}{word_size - 1:05b}" + "".join(f"{s - 1:04b}" for s in sizes)
    for repeat, k, words in tokens:
        n = len(words) - 1 if not repeat else words[1] - 1
        bits += ("1" if repeat else "0") + f"{k:02b}" + format(n, f"0{sizes[k]}b")
        values = [words[0]] if repeat else words
        bits += "".join(format(v, f"0{word_size}b") for v in values)
    bits += "0" * (8 - len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


@st.composite
def streams(draw):
    word_size = draw(st.integers(1, 8))
    sizes = tuple(draw(st.lists(st.integers(1, 16), min_size=4, max_size=4)))
    tokens, total = [], 0
    for _ in range(draw(st.integers(1, 12))):
        k = draw(st.integers(0, 3))
        count = draw(st.integers(1, min(2 ** sizes[k], 40)))
        if draw(st.booleans()):
            tokens.append((True, k, (draw(st.integers(0, 2**word_size - 1)), count)))
        else:
            tokens.append((False, k, draw(st.lists(st.integers(0, 2**word_size - 1), min_size=count, max_size=count))))
        total += count
    return write_stream(total, word_size, sizes, tokens)


@SETTINGS
@given(streams())
def test_literal_tokens_and_other_headers_decode_like_the_sdk(stream):
    assert np.array_equal(decode_rle_values(stream), brush.decode_rle(stream))


def test_alpha_channel_decides_inside():
    # RGB set but alpha 0 is outside; alpha 1 (faint) is inside unless a threshold says otherwise.
    raster = np.array([[200, 10, 10, 0], [0, 0, 0, 1], [5, 5, 5, 255]], dtype=np.uint8).ravel()
    stream = brush.encode_rle(raster)
    assert decode_rle(stream, 1, 3).tolist() == [[False, True, True]]
    assert decode_rle(stream, 1, 3, threshold=127).tolist() == [[False, False, True]]


def valid_stream() -> list[int]:
    mask = np.zeros((20, 30), bool)
    mask[5:12, 3:25] = True
    return encode_rle(mask)


@pytest.mark.parametrize(
    "rle",
    [
        [],
        [0, 0, 1],
        "not a list",
        None,
        123,
        [1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
        [300] * 20,
        [-1] * 20,
        ["a"] * 20,
        valid_stream()[:12],
        valid_stream()[:-3],
    ],
    ids=[
        "empty",
        "too-short",
        "string",
        "none",
        "int",
        "floats",
        "over-255",
        "negative",
        "strings",
        "cut-after-header",
        "truncated",
    ],
)
def test_bad_rle_raises_bad_request(rle):
    with pytest.raises(BadRequest):
        decode_rle(rle, 20, 30)


def test_wrong_size_raises_bad_request_naming_the_sizes():
    with pytest.raises(BadRequest, match="2400"):
        decode_rle(valid_stream(), 30, 30)


def test_absurd_header_is_refused_before_allocating():
    with pytest.raises(BadRequest):
        decode_rle_values([255] * 16)


@SETTINGS
@given(st.lists(st.integers(0, 255), min_size=0, max_size=200))
def test_garbage_never_raises_anything_but_bad_request(garbage):
    try:
        mask = decode_rle(garbage, 4, 5)
    except BadRequest:
        return
    assert mask.shape == (4, 5) and mask.dtype == bool


@SETTINGS
@given(st.data())
def test_corrupted_valid_streams_decode_or_raise_bad_request(data):
    stream = valid_stream()
    index = data.draw(st.integers(8, len(stream) - 1))
    stream[index] = data.draw(st.integers(0, 255))
    with contextlib.suppress(BadRequest):
        decode_rle(stream, 20, 30)


def test_encode_rejects_non_2d_masks():
    with pytest.raises(BadRequest):
        encode_rle(np.zeros((2, 2, 2), bool))
    with pytest.raises(BadRequest):
        encode_rle(np.zeros((0, 5), bool))


def test_realistic_masks_match_the_sdk(shared_data):
    from PIL import Image

    for path in sorted((shared_data / "dsb2018" / "labels").glob("*.png"))[:3]:
        instances = np.array(Image.open(path))
        assert_matches_sdk(instances > 0)
        assert_matches_sdk(instances == instances.max())


def test_streams_longer_than_any_encoding_are_refused():
    stream = encode_rle(np.ones((1, 1), bool))
    with pytest.raises(BadRequest, match="more than"):
        decode_rle(stream + [0] * 64, 1, 1)
