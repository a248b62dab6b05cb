"""Embeddings and refinement logits as compact bytes for the shared (Redis) cache, and back.

A value is `MAGIC`, a version byte, a 4-byte big-endian header length, a JSON header, then the
arrays' raw bytes back to back (C order, little-endian)::

    {"kind": "sam", "width": W, "height": H, "meta": {...}, "arrays": [{"dtype": "f2", "shape": [1, 256, 64, 64]}]}

Float arrays are stored as fp16 ("f2"; 2 MiB for a SAM 256x64x64 embedding instead of 4) unless
a value lies outside fp16's range, then as fp32 ("f4"); the classic engine's image stays uint8.
Refinement logits are stored as fp32: they are small (256 KiB) and refinement then matches the
replica that decoded the earlier click exactly.

Whatever comes back from Redis is hostile: `decode_*` check the magic, version, header, kinds,
dtypes, shapes and that the byte length is exactly what the header says, and raise `BadValue`
(a miss for the caller) instead of building something an engine would choke on.

Kinds (the engine families whose embeddings we know how to rebuild; other engines stay L1-only):
- "sam": `SamEmbedding` (features 1xCxhxw, original and input size), sam.engines.segment_anything_engine
- "hf": `HfEmbedding` (the feature pyramid, optional SAM 3 backbone output), sam.engines.hf_sam2 / hf_sam3
- "classic": `ClassicEmbedding` (the HxWx3 uint8 image itself), sam.engines.classic
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"SAMC"
VERSION = 1
_PREFIX = struct.Struct(">4sBI")  # magic, version, header length
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 8
MAX_NDIM = 4
MAX_SIDE = 1 << 20  # pixels per image side, and elements per array dimension
_DTYPES: dict[str, np.dtype] = {"f2": np.dtype("<f2"), "f4": np.dtype("<f4"), "u1": np.dtype("u1")}
_FP16_MAX = float(np.finfo(np.float16).max)

# the class of an embedding (module, name) -> its kind; engine modules -> the kind they produce
EMBEDDING_KINDS = {
    ("sam.engines.segment_anything_engine", "SamEmbedding"): "sam",
    ("sam.engines.hf_sam2", "HfEmbedding"): "hf",
    ("sam.engines.classic", "ClassicEmbedding"): "classic",
}
ENGINE_KINDS = {
    "sam.engines.segment_anything_engine": "sam",
    "sam.engines.hf_sam2": "hf",
    "sam.engines.hf_sam3": "hf",
    "sam.engines.classic": "classic",
}


class BadValue(ValueError):
    """A stored value that is not a well-formed value of the expected kind (a miss, with a reason)."""


@dataclass(frozen=True)
class Decoded:
    """A decoded embedding and the size of the image it belongs to (pixels)."""

    embedding: Any
    width: int
    height: int


def engine_kind(engine: Any) -> str | None:
    """The kind of embedding `engine` makes (its class or a base class is a built-in engine), or
    None for an engine whose embeddings we cannot rebuild (it then uses the in-process cache only)."""
    for cls in type(engine).__mro__:
        kind = ENGINE_KINDS.get(cls.__module__)
        if kind is not None:
            return kind
    return None


def kind_of(embedding: Any) -> str | None:
    cls = type(embedding)
    return EMBEDDING_KINDS.get((cls.__module__, cls.__qualname__))


# -- encoding ------------------------------------------------------------------------------------


def encode_embedding(embedding: Any, width: int, height: int) -> bytes:
    """One engine embedding of a `width` x `height` image -> bytes. ValueError for an unknown kind."""
    kind = kind_of(embedding)
    meta: dict[str, Any]
    if kind == "sam":
        arrays = [_numpy(embedding.features)]
        meta = {"original_size": list(embedding.original_size), "input_size": list(embedding.input_size)}
    elif kind == "hf":
        arrays = [_numpy(level) for level in embedding.features]
        backbone = embedding.backbone is not None
        if backbone:
            arrays.append(_numpy(embedding.backbone))
        meta = {"original_size": list(embedding.original_size), "levels": len(embedding.features), "backbone": backbone}
    elif kind == "classic":
        arrays, meta = [np.asarray(embedding.image, np.uint8)], {}
    else:
        raise ValueError(f"no codec for embeddings of type {type(embedding).__name__}")
    return _pack(kind, width, height, meta, [_compact(array) for array in arrays])


def encode_refinement(points: tuple, point_labels: tuple, logits: np.ndarray) -> bytes:
    """A region's clicks ((x, y) pixels, 1/0 labels) and its hxw low-resolution logits -> bytes (fp32)."""
    meta = {"points": [[float(x), float(y)] for x, y in points], "point_labels": [int(v) for v in point_labels]}
    return _pack("refinement", 0, 0, meta, [np.asarray(logits, "<f4")])


def _numpy(tensor: Any) -> np.ndarray:
    """A torch tensor (any device) or array -> a float32 NumPy array on the CPU."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().float().cpu().numpy()
    return np.asarray(tensor, np.float32)


def _compact(array: np.ndarray) -> np.ndarray:
    """fp16 for float arrays whose finite values all fit fp16, else fp32; other dtypes unchanged."""
    if array.dtype.kind != "f":
        return array
    if array.size and float(np.abs(array).max()) > _FP16_MAX:
        return array.astype("<f4")
    return array.astype("<f2")


def _pack(kind: str, width: int, height: int, meta: dict, arrays: list[np.ndarray]) -> bytes:
    specs = [{"dtype": _dtype_code(array.dtype), "shape": [int(side) for side in array.shape]} for array in arrays]
    header = json.dumps(
        {"kind": kind, "width": int(width), "height": int(height), "meta": meta, "arrays": specs},
        separators=(",", ":"),
    ).encode()
    parts = [_PREFIX.pack(MAGIC, VERSION, len(header)), header]
    parts += [np.ascontiguousarray(array).tobytes() for array in arrays]
    return b"".join(parts)


def _dtype_code(dtype: np.dtype) -> str:
    for code, known in _DTYPES.items():
        if np.dtype(dtype) == known:
            return code
    raise ValueError(f"no code for dtype {dtype}")


# -- decoding ------------------------------------------------------------------------------------


def decode_embedding(blob: bytes, expected_kind: str, device: str = "cpu") -> Decoded:
    """Bytes from `encode_embedding` -> Decoded (tensors as float32 on `device`). BadValue if the
    bytes are not a well-formed embedding of `expected_kind`."""
    kind, width, height, meta, arrays = _unpack(blob)
    if kind != expected_kind:
        raise BadValue(f"an embedding of kind {kind!r} where {expected_kind!r} was expected")
    _check_size(width, height)
    if kind == "classic":
        embedding = _classic(arrays, width, height)
    elif kind == "sam":
        embedding = _sam(arrays, meta, width, height, device)
    elif kind == "hf":
        embedding = _hf(arrays, meta, width, height, device)
    else:
        raise BadValue(f"unknown embedding kind {kind!r}")
    return Decoded(embedding, width, height)


def decode_refinement(blob: bytes) -> tuple[tuple, tuple, np.ndarray]:
    """Bytes from `encode_refinement` -> (points, point_labels, 2-D float32 logits). BadValue otherwise."""
    kind, _, _, meta, arrays = _unpack(blob)
    if kind != "refinement" or len(arrays) != 1 or arrays[0].ndim != 2:
        raise BadValue("not a refinement value")
    points, labels = meta.get("points"), meta.get("point_labels")
    if not isinstance(points, list) or not isinstance(labels, list) or len(points) != len(labels):
        raise BadValue("refinement clicks are malformed")
    if not all(isinstance(p, list) and len(p) == 2 and all(_finite_number(v) for v in p) for p in points) or not all(
        _whole(v) and v in (0, 1) for v in labels
    ):
        raise BadValue("refinement clicks are malformed")
    logits = _finite_float32(arrays[0])
    return tuple((float(x), float(y)) for x, y in points), tuple(labels), logits


def _unpack(blob: bytes) -> tuple[str, int, int, dict, list[np.ndarray]]:
    if not isinstance(blob, (bytes, bytearray)) or len(blob) < _PREFIX.size:
        raise BadValue("shorter than a header")
    magic, version, header_length = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise BadValue("not a shared-cache value (wrong magic)")
    if version != VERSION:
        raise BadValue(f"format version {version}, expected {VERSION}")
    if header_length > MAX_HEADER_BYTES or _PREFIX.size + header_length > len(blob):
        raise BadValue(f"a header of {header_length} bytes does not fit")
    try:
        header = json.loads(bytes(blob[_PREFIX.size : _PREFIX.size + header_length]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BadValue("the header is not JSON") from None
    if not isinstance(header, dict):
        raise BadValue("the header is not an object")
    fields: Any = [header.get(name) for name in ("kind", "width", "height", "meta", "arrays")]
    kind, width, height, meta, specs = fields
    if not isinstance(kind, str) or not _whole(width) or not _whole(height) or not isinstance(meta, dict):
        raise BadValue("the header lacks kind, width, height or meta")
    if not isinstance(specs, list) or not 1 <= len(specs) <= MAX_ARRAYS:
        raise BadValue("the header lists no arrays, or too many")
    offset = _PREFIX.size + header_length
    arrays = []
    for spec in specs:
        dtype, shape = _array_spec(spec)
        size = math.prod(shape) * dtype.itemsize
        if offset + size > len(blob):
            raise BadValue(f"{len(blob)} bytes, shorter than its header says")
        arrays.append(np.frombuffer(blob, dtype, math.prod(shape), offset).reshape(shape))
        offset += size
    if offset != len(blob):
        raise BadValue(f"{len(blob)} bytes where its header says {offset}")
    return kind, width, height, meta, arrays


def _array_spec(spec: Any) -> tuple[np.dtype, tuple[int, ...]]:
    if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES or not isinstance(spec.get("shape"), list):
        raise BadValue("an array without a known dtype or a shape")
    shape = spec["shape"]
    if not 1 <= len(shape) <= MAX_NDIM or not all(_whole(side) and 0 < side <= MAX_SIDE for side in shape):
        raise BadValue(f"an array of shape {shape!r}")
    return _DTYPES[spec["dtype"]], tuple(shape)


def _classic(arrays: list[np.ndarray], width: int, height: int) -> Any:
    from sam.engines.classic import ClassicEmbedding

    if len(arrays) != 1 or arrays[0].dtype != np.uint8 or arrays[0].shape != (height, width, 3):
        raise BadValue(f"a classic embedding must be one {height}x{width}x3 uint8 image")
    return ClassicEmbedding(arrays[0].copy())  # a copy: frombuffer views are read-only


def _sam(arrays: list[np.ndarray], meta: dict, width: int, height: int, device: str) -> Any:
    from sam.engines.segment_anything_engine import SamEmbedding

    original, resized = _size(meta.get("original_size")), _size(meta.get("input_size"))
    if original != (height, width) or len(arrays) != 1 or arrays[0].ndim != 4 or arrays[0].shape[0] != 1:
        raise BadValue("a sam embedding must be one 1xCxhxw array of the image's size")
    if arrays[0].dtype == np.uint8 or max(resized) > 4096:
        raise BadValue("a sam embedding with a wrong dtype or input size")
    return SamEmbedding(features=_tensor(arrays[0], device), original_size=original, input_size=resized)


def _hf(arrays: list[np.ndarray], meta: dict, width: int, height: int, device: str) -> Any:
    from sam.engines.hf_sam2 import HfEmbedding

    original, backbone = _size(meta.get("original_size")), meta.get("backbone")
    levels: Any = meta.get("levels")
    if original != (height, width) or not _whole(levels) or not isinstance(backbone, bool):
        raise BadValue("an hf embedding without its size, levels or backbone flag")
    if len(arrays) != levels + int(backbone) or not 1 <= levels <= 4:
        raise BadValue("an hf embedding with the wrong number of arrays")
    if any(a.dtype == np.uint8 or a.ndim != 4 or a.shape[0] != 1 for a in arrays[:levels]):
        raise BadValue("hf feature levels must be 1xCxhxw float arrays")
    if backbone and (arrays[-1].dtype == np.uint8 or arrays[-1].ndim != 3 or arrays[-1].shape[0] != 1):
        raise BadValue("an hf backbone output must be a 1xTxC float array")
    return HfEmbedding(
        features=tuple(_tensor(a, device) for a in arrays[:levels]),
        original_size=original,
        backbone=_tensor(arrays[-1], device) if backbone else None,
    )


def _tensor(array: np.ndarray, device: str) -> Any:
    import torch

    return torch.from_numpy(_finite_float32(array)).to(device)


def _finite_float32(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind != "f":
        raise BadValue(f"a {array.dtype} array where floats were expected")
    values = array.astype(np.float32)  # a writable copy
    if not np.isfinite(values).all():
        raise BadValue("non-finite values")
    return values


def _size(value: Any) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2 or not all(_whole(v) and 0 < v <= MAX_SIDE for v in value):
        raise BadValue(f"a size of {value!r}")
    return int(value[0]), int(value[1])


def _check_size(width: int, height: int) -> None:
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise BadValue(f"an image size of {width}x{height}")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
