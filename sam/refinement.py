"""Refinement across clicks: the previous mask's low-resolution logits, fed back as `mask_input`.

When an annotator adds a click to a region the backend already answered (Label Studio resends the
region's rectangle and every click in the context), the decoder gets that region's previous
logits as `mask_input` (as in SAM's papers, CVAT and Roboflow), so each click improves the mask
instead of starting over.

A region is named by its image and its anchor: the rectangle (which Label Studio resends
unchanged) or, for clicks without a rectangle, the label and the first positive click. Logits
are reused only when the earlier prompt is a prefix of this one (same anchor, its clicks first,
at least one new click). They live in the embedding cache, inside EMBEDDING_CACHE_MB (a SAM or
SAM 2.1 region costs 256 KiB), and leave it with the same LRU rule. With a shared cache (REDIS_URL)
they are also written to Redis and read from there first, so the next click refines the last answer
whichever replica gave it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sam.embedding_codec import decode_refinement, encode_refinement
from sam.prompts import Prompt

_PREFIX = "refine|"  # image identities never start with it: they start with the origin or task id


@dataclass(frozen=True)
class Refinement:
    """The last answer for one region: the clicks it was decoded from and its logits (hxw float32)."""

    points: tuple[tuple[float, float], ...]
    point_labels: tuple[int, ...]
    logits: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.logits.nbytes)


def region_key(identity: str, prompt: Prompt) -> str:
    """The cache key of the region `prompt` draws on the image `identity`."""
    if prompt.box is not None:
        anchor = "box:" + ",".join(f"{v:.2f}" for v in prompt.box)
    else:
        first = next(
            (xy for xy, sign in zip(prompt.points, prompt.point_labels, strict=True) if sign), prompt.points[0]
        )
        anchor = f"points:{first[0]:.2f},{first[1]:.2f}"
    return f"{_PREFIX}{identity}|{prompt.to_name}|{prompt.label}|{anchor}"


def is_refinement_key(key: str) -> bool:
    return key.startswith(_PREFIX)


def extends(earlier: Refinement, prompt: Prompt) -> bool:
    """Whether `prompt` is `earlier`'s clicks plus at least one more."""
    count = len(earlier.points)
    return (
        len(prompt.points) > count
        and tuple(prompt.points[:count]) == earlier.points
        and tuple(prompt.point_labels[:count]) == earlier.point_labels
    )


class RefinementMemory:
    """Previous logits per region, kept in a byte-capped cache shared with the embeddings.

    `cache`: a `ByteLRU[str, Any]` whose `sizeof` counts `Refinement.nbytes`; `shared`: the
    replicas' `SharedEmbeddings` (sam.shared_embeddings), or None.
    """

    def __init__(self, cache: Any, shared: Any = None) -> None:
        self._cache = cache
        self._shared = shared

    def previous_logits(self, identity: str, prompt: Prompt) -> np.ndarray | None:
        """The logits to refine from, or None when this prompt starts a new region."""
        if not prompt.points:  # only an added click refines: no lookup (no Redis call) for a lone box
            return None
        key = region_key(identity, prompt)
        # Redis first: this replica's own copy may be older than another replica's last answer
        earlier = self._shared.load_refinement(key, _decoded) if self._shared is not None else None
        if earlier is not None:
            self._cache.put(key, earlier)
        else:
            earlier = self._cache.get(key)
        if isinstance(earlier, Refinement) and extends(earlier, prompt):
            return earlier.logits
        return None

    def remember(self, identity: str, prompt: Prompt, logits: np.ndarray) -> None:
        refinement = Refinement(tuple(prompt.points), tuple(prompt.point_labels), np.asarray(logits, np.float32))
        key = region_key(identity, prompt)
        self._cache.put(key, refinement)
        if self._shared is not None:
            self._shared.store_refinement(
                key, encode_refinement(refinement.points, refinement.point_labels, refinement.logits)
            )


def _decoded(blob: bytes) -> Refinement:
    return Refinement(*decode_refinement(blob))
