"""The shared cache's byte format: embeddings of every built-in engine kind survive the round trip
(fp16 where it is lossless enough), and bytes that are not a well-formed value of the expected kind
are refused with BadValue, never with another exception."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sam.embedding_codec import (
    MAGIC,
    BadValue,
    decode_embedding,
    decode_refinement,
    encode_embedding,
    encode_refinement,
    engine_kind,
)
from sam.engines.classic import ClassicEmbedding, ClassicEngine


def classic_blob(height: int = 5, width: int = 7) -> bytes:
    image = np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3)
    return encode_embedding(ClassicEmbedding(image), width, height)


def blob_with(header: dict, payload: bytes, version: int = 1) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack(">4sBI", MAGIC, version, len(text)) + text + payload


def test_a_classic_embedding_round_trips_exactly():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    decoded = decode_embedding(encode_embedding(ClassicEmbedding(image), 7, 5), "classic")
    assert (decoded.width, decoded.height) == (7, 5)
    assert isinstance(decoded.embedding, ClassicEmbedding)
    assert np.array_equal(decoded.embedding.image, image)
    decoded.embedding.image[0, 0, 0] ^= 1  # writable: not a view of the bytes


def test_a_sam_embedding_is_stored_as_fp16_and_comes_back_float32():
    torch = pytest.importorskip("torch")
    from sam.engines.segment_anything_engine import SamEmbedding

    features = torch.randn(1, 256, 64, 64)
    blob = encode_embedding(SamEmbedding(features, (480, 640), (768, 1024)), 640, 480)
    assert len(blob) < 256 * 64 * 64 * 2 + 512  # 2 MiB of fp16 and a small header
    decoded = decode_embedding(blob, "sam")
    assert decoded.embedding.original_size == (480, 640) and decoded.embedding.input_size == (768, 1024)
    assert decoded.embedding.features.dtype == torch.float32
    assert torch.equal(decoded.embedding.features, features.half().float())


def test_values_beyond_fp16_range_are_kept_in_fp32():
    torch = pytest.importorskip("torch")
    from sam.engines.segment_anything_engine import SamEmbedding

    features = torch.full((1, 2, 2, 2), 1e6)
    decoded = decode_embedding(encode_embedding(SamEmbedding(features, (4, 4), (4, 4)), 4, 4), "sam")
    assert torch.equal(decoded.embedding.features, features)


def test_an_hf_embedding_keeps_its_levels_and_backbone():
    torch = pytest.importorskip("torch")
    from sam.engines.hf_sam2 import HfEmbedding

    levels = (torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4))
    backbone = torch.randn(1, 16, 6)
    for with_backbone in (None, backbone):
        blob = encode_embedding(HfEmbedding(levels, (10, 12), with_backbone), 12, 10)
        decoded = decode_embedding(blob, "hf").embedding
        assert [tuple(level.shape) for level in decoded.features] == [(1, 4, 8, 8), (1, 8, 4, 4)]
        assert (decoded.backbone is None) == (with_backbone is None)
        assert torch.equal(decoded.features[1], levels[1].half().float())


def test_a_refinement_round_trips_exactly():
    logits = np.random.default_rng(1).normal(size=(256, 256)).astype(np.float32) * 40
    points, labels, back = decode_refinement(encode_refinement(((1.5, 2.25), (3.0, 4.0)), (1, 0), logits))
    assert points == ((1.5, 2.25), (3.0, 4.0)) and labels == (1, 0)
    assert np.array_equal(back, logits)


def test_engines_are_mapped_to_their_kind_and_others_to_none():
    assert engine_kind(ClassicEngine()) == "classic"
    assert engine_kind(object()) is None


@pytest.mark.parametrize(
    "mangle, reason",
    [
        (lambda b: b[:5], "shorter than a header"),
        (lambda b: b[:20], "does not fit"),
        (lambda b: b[:-1], "shorter than its header says"),
        (lambda b: b + b"\0", "bytes where its header says"),
        (lambda b: b"XXXX" + b[4:], "wrong magic"),
        (lambda b: b[:4] + b"\x07" + b[5:], "format version 7"),
        (lambda b: b[:5] + struct.pack(">I", 10**9) + b[9:], "does not fit"),
        (lambda b: b"", "shorter than a header"),
    ],
)
def test_damaged_bytes_are_refused(mangle, reason):
    with pytest.raises(BadValue, match=reason):
        decode_embedding(mangle(classic_blob()), "classic")


def test_a_value_of_another_kind_is_refused():
    with pytest.raises(BadValue, match="kind 'classic' where 'sam'"):
        decode_embedding(classic_blob(), "sam")


@pytest.mark.parametrize(
    "header, payload",
    [
        ({"kind": "classic", "width": 2, "height": 2, "meta": {}, "arrays": [{"dtype": "u1", "shape": [2, 2, 4]}]}, 16),
        ({"kind": "classic", "width": 2, "height": 2, "meta": {}, "arrays": [{"dtype": "f8", "shape": [2, 2, 3]}]}, 96),
        ({"kind": "classic", "width": 2, "height": 2, "meta": {}, "arrays": [{"dtype": "u1", "shape": [-2, 2, 3]}]}, 0),
        ({"kind": "classic", "width": 0, "height": 2, "meta": {}, "arrays": [{"dtype": "u1", "shape": [2, 0, 3]}]}, 0),
        ({"kind": "classic", "width": 2, "height": 2, "meta": {}, "arrays": []}, 0),
        (
            {"kind": "classic", "width": "2", "height": 2, "meta": {}, "arrays": [{"dtype": "u1", "shape": [2, 2, 3]}]},
            12,
        ),
        (["not", "an", "object"], 0),
    ],
)
def test_a_header_that_lies_is_refused(header, payload):
    with pytest.raises(BadValue):
        decode_embedding(blob_with(header, b"\0" * payload), "classic")


def test_a_sam_value_with_non_finite_numbers_is_refused():
    pytest.importorskip("torch")
    header = {
        "kind": "sam",
        "width": 4,
        "height": 4,
        "meta": {"original_size": [4, 4], "input_size": [4, 4]},
        "arrays": [{"dtype": "f2", "shape": [1, 1, 2, 2]}],
    }
    with pytest.raises(BadValue, match="non-finite"):
        decode_embedding(blob_with(header, np.array([0, np.nan, 1, 2], "<f2").tobytes()), "sam")


def test_a_refinement_with_malformed_clicks_is_refused():
    header = {
        "kind": "refinement",
        "width": 0,
        "height": 0,
        "meta": {"points": [[1.0, "x"]], "point_labels": [1]},
        "arrays": [{"dtype": "f4", "shape": [2, 2]}],
    }
    with pytest.raises(BadValue, match="malformed"):
        decode_refinement(blob_with(header, b"\0" * 16))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 120))
def test_any_bytes_give_a_value_or_bad_value_never_another_error(noise, cut):
    good = classic_blob(3, 3)
    for blob in (noise, good[:cut] + noise, MAGIC + noise):
        with contextlib.suppress(BadValue):
            decode_embedding(blob, "classic")
