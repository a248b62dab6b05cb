"""An in-process stand-in for backends.images.fetcher.ImageFetcher: no network, every load recorded."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from backends.errors import ImageUnavailable
from backends.images.fetcher import LoadedImage


class FakeImageFetcher:
    """Images by URI: `images` {uri: (H, W, 3) uint8}; a URI not there gets `default`, or raises
    ImageUnavailable when there is none. Loads land in `calls` as (uri, task_id)."""

    def __init__(self, images: Mapping[str, np.ndarray] | None = None, default: np.ndarray | None = None):
        self.images = images if images is not None else {}  # kept, not copied: tests add to it
        self.default = default
        self.calls: list[tuple[str, int | None]] = []

    @staticmethod
    def identity(uri: str, task_id) -> str:
        return f"{task_id}:{uri}"

    def load(self, uri: str, task_id: int | None = None) -> LoadedImage:
        self.calls.append((uri, task_id))
        pixels = self.images.get(uri, self.default)
        if pixels is None:
            raise ImageUnavailable(f"image {uri} was not found")
        return LoadedImage(pixels=pixels, identity=self.identity(uri, task_id))
