"""The regions the backend answered lately, so that a later click can correct one of them.

Label Studio's editor sends, with each smart click, only the smart regions of the same kind and
label that are still on the image (web/libs/editor/src/mixins/Regions.js,
`getConnectedDynamicRegions`), and with Auto-Accept it deletes every smart prompt as soon as an
answer arrives (Annotation.js, `acceptAllSuggestions` -> `deleteAllDynamicregions`). A click after
a box therefore arrives without its box: an Alt-click inside a nucleus is a negative-only prompt
that describes no object at all.

This memory turns it back into what the annotator meant: clicks that all fall inside the box of a
region answered on the same image with the same label refine that region (its box, its earlier
clicks and the new ones), and the answer reuses the region's id, which makes the editor replace
the region in place (Annotation.js, `acceptSuggestion`: an accepted suggestion overwrites the area
with its id). Bounded: at most `max_images` (image, label) entries, each with its last
`per_image` regions, least recently used out first. With REDIS_URL the list of each (image,
label) is also kept in Redis (sam.shared_embeddings, one hour at most) and read from there first,
so a click that reaches another replica corrects the same region; what Redis holds is checked
like any other hostile input (a bad value is a miss).
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from sam.embedding_codec import BadValue
from sam.prompts import Prompt

XYXY = tuple[float, float, float, float]


@dataclass(frozen=True)
class AnsweredRegion:
    """A region the backend answered: its prompt (box and clicks, pixels) and its result id."""

    prompt: Prompt
    region_id: str


MAX_ID_CHARS = 128
MAX_NAME_CHARS = 1024
MAX_CLICKS = 256  # clicks kept on one region (an annotator's corrections, with a wide margin)


class LastRegions:
    """`shared`: the replicas' `SharedEmbeddings` (sam.shared_embeddings), or None."""

    def __init__(self, max_images: int = 1024, per_image: int = 32, shared: Any = None):
        self._max_images = max_images
        self._per_image = per_image
        self._shared = shared
        self._regions: OrderedDict[str, list[AnsweredRegion]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, image: str, prompt: Prompt, region_id: str) -> None:
        """Record the answer `region_id` to a box prompt on `image` (identity of the image)."""
        if prompt.box is None:
            return
        key = _key(image, prompt)
        with self._lock:
            # one entry per box: an answer Label Studio dropped for a newer one had the same box
            regions = [r for r in self._regions.pop(key, []) if r.region_id != region_id and r.prompt.box != prompt.box]
            regions.append(AnsweredRegion(prompt, region_id))
            regions = self._regions[key] = regions[-self._per_image :]
            while len(self._regions) > self._max_images:
                self._regions.popitem(last=False)
        if self._shared is not None:
            self._shared.store_regions(key, encode_regions(regions))

    def refinement(self, image: str, clicks: Prompt) -> AnsweredRegion | None:
        """For a clicks-only prompt: the answered region whose box holds every click (the smallest,
        then the latest), as a prompt with its box and all its clicks, or None."""
        if clicks.box is not None or not clicks.points:
            return None
        key = _key(image, clicks)
        # Redis first: another replica may have answered this image's latest box
        shared = self._shared.load_regions(key, self._decoder(clicks)) if self._shared is not None else None
        with self._lock:
            if shared:
                self._regions[key] = shared
            regions = list(self._regions.get(key, ()))
            if regions:
                self._regions.move_to_end(key)
        holding = [
            (index, r) for index, r in enumerate(regions) if all(_inside(r.prompt.box, xy) for xy in clicks.points)
        ]
        if not holding:
            return None
        _, chosen = min(holding, key=lambda item: (_area(item[1].prompt.box), -item[0]))
        # Without Auto-Accept the editor resends every click still on the image: add only new ones
        new = [(xy, sign) for xy, sign in zip(clicks.points, clicks.point_labels, strict=True)]
        new = [(xy, sign) for xy, sign in new if xy not in chosen.prompt.points]
        merged = replace(
            chosen.prompt,
            points=chosen.prompt.points + tuple(xy for xy, _ in new),
            point_labels=chosen.prompt.point_labels + tuple(sign for _, sign in new),
        )
        return AnsweredRegion(merged, chosen.region_id)

    def _decoder(self, clicks: Prompt):
        return lambda blob: decode_regions(blob, clicks.label, clicks.to_name, self._per_image)


def encode_regions(regions: list[AnsweredRegion]) -> bytes:
    """The answered regions of one (image, label) as compact JSON, for Redis."""
    return json.dumps(
        [
            {
                "id": r.region_id,
                "from": r.prompt.from_name,
                "box": list(r.prompt.box or ()),
                "points": [list(xy) for xy in r.prompt.points],
                "signs": list(r.prompt.point_labels),
            }
            for r in regions
        ],
        separators=(",", ":"),
    ).encode()


def decode_regions(blob: bytes, label: str, to_name: str, max_regions: int) -> list[AnsweredRegion]:
    """Regions read back from Redis, every field checked (BadValue for anything else); the label
    and image tag are those of the key they were stored under."""
    try:
        items = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadValue(f"answered regions are not JSON: {error}") from None
    if not isinstance(items, list) or len(items) > max_regions:
        raise BadValue(f"answered regions: expected a list of at most {max_regions}")
    return [_decoded_region(item, label, to_name) for item in items]


def _decoded_region(item: Any, label: str, to_name: str) -> AnsweredRegion:
    if not isinstance(item, dict):
        raise BadValue("answered region: expected an object")
    region_id, from_name = item.get("id"), item.get("from")
    box, points, signs = item.get("box"), item.get("points"), item.get("signs")
    if not (isinstance(region_id, str) and 0 < len(region_id) <= MAX_ID_CHARS):
        raise BadValue("answered region: bad id")
    if not (isinstance(from_name, str) and len(from_name) <= MAX_NAME_CHARS):
        raise BadValue("answered region: bad tool name")
    if not (isinstance(box, list) and len(box) == 4 and all(_finite(v) for v in box)):
        raise BadValue("answered region: bad box")
    if not (isinstance(points, list) and isinstance(signs, list) and len(points) == len(signs) <= MAX_CLICKS):
        raise BadValue("answered region: bad clicks")
    if not all(isinstance(xy, list) and len(xy) == 2 and all(_finite(v) for v in xy) for xy in points):
        raise BadValue("answered region: bad click position")
    if not all(sign in (0, 1) and not isinstance(sign, bool) for sign in signs):
        raise BadValue("answered region: bad click sign")
    prompt = Prompt(
        label=label,
        to_name=to_name,
        box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
        points=tuple((float(x), float(y)) for x, y in points),
        point_labels=tuple(int(sign) for sign in signs),
        from_name=from_name,
    )
    return AnsweredRegion(prompt, region_id)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _key(image: str, prompt: Prompt) -> str:
    return f"{image}|{prompt.to_name}|{prompt.label}"


def _inside(box: XYXY | None, xy: tuple[float, float]) -> bool:
    return box is not None and box[0] <= xy[0] <= box[2] and box[1] <= xy[1] <= box[3]


def _area(box: XYXY | None) -> float:
    return 0.0 if box is None else (box[2] - box[0]) * (box[3] - box[1])
