"""How many decoded pixels the process holds at once: a budget that decodes wait for.

A decoded image costs 3 bytes per pixel to hold, and about 4 more while it is decoded; caches do
not bound that, so 24 concurrent 16 MP requests took a SAM backend to +3.2 GB. Every decode
reserves its pixel count (from the header, before decoding) and gives it back when the caller is
done with the pixels, and at most `decoders` images are decoded at the same time; a decode that
does not get both waits its turn (first come, first served) at most `wait_s`, then the request is
answered 503 (Overloaded). Peak memory for images is then about 3 bytes x `capacity` plus 4 bytes x
the pixels of the `decoders` largest images being decoded.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from backends.errors import Overloaded


class PixelBudget:
    """At most `capacity` pixels reserved at a time (DECODE_MAX_INFLIGHT_MEGAPIXELS). Thread-safe.

    A single image larger than the whole budget is admitted alone (it waits until nothing else is
    reserved), so a budget below IMAGE_MAX_MEGAPIXELS never refuses an allowed image outright.
    """

    def __init__(self, capacity: int, wait_s: float, decoders: int = 2):
        if capacity <= 0 or decoders <= 0:
            raise ValueError(f"the pixel budget and the decoders must be positive, got {capacity}, {decoders}")
        self.capacity = int(capacity)
        self.wait_s = float(wait_s)
        self.decoders = int(decoders)
        self._in_use = 0
        self._queue: collections.deque[object] = collections.deque()
        self._changed = threading.Condition()
        self._decoding = threading.BoundedSemaphore(self.decoders)

    @property
    def in_use(self) -> int:
        """Pixels reserved now."""
        with self._changed:
            return self._in_use

    def reserve(self, pixels: int, name: str = "the image") -> Reservation:
        """Reserve `pixels` (waiting up to wait_s behind earlier reservations); use the result as a
        context manager, or call `release()`. Raises Overloaded when the wait runs out."""
        amount = min(max(int(pixels), 0), self.capacity)
        ticket = object()
        deadline = time.monotonic() + self.wait_s
        with self._changed:
            self._queue.append(ticket)
            try:
                while not (self._queue[0] is ticket and self._in_use + amount <= self.capacity):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise Overloaded(
                            f"the backend is busy decoding other images: {name} ({pixels / 1e6:.1f} MP) waited "
                            f"{self.wait_s:g} s for memory (DECODE_MAX_INFLIGHT_MEGAPIXELS="
                            f"{self.capacity / 1e6:g}, DECODE_WAIT_TIMEOUT); try again shortly"
                        )
                    self._changed.wait(remaining)
                self._in_use += amount
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()  # the next in line may fit now
        return Reservation(self, amount)

    @contextlib.contextmanager
    def decoding(self, name: str = "the image") -> Iterator[None]:
        """One of the `decoders` decode slots for the block. Raises Overloaded after wait_s."""
        if not self._decoding.acquire(timeout=self.wait_s):
            raise Overloaded(
                f"the backend is busy decoding other images: {name} waited {self.wait_s:g} s for a decoder "
                f"(DECODE_CONCURRENCY={self.decoders}, DECODE_WAIT_TIMEOUT); try again shortly"
            )
        try:
            yield
        finally:
            self._decoding.release()

    def _release(self, amount: int) -> None:
        with self._changed:
            self._in_use -= amount
            self._changed.notify_all()


class Reservation:
    """Pixels held in a PixelBudget until `release()` (idempotent) or the end of a `with` block."""

    def __init__(self, budget: PixelBudget, amount: int):
        self._budget = budget
        self.amount = amount
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._budget._release(self.amount)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def holding_image(images: Any, uri: str, task_id: int | None) -> contextlib.AbstractContextManager[Any]:
    """`images.loaded(uri, task_id)` (ImageFetcher: the pixels stay in the decode budget until the
    block ends), or `images.load(...)` for image sources that only have that (test doubles)."""
    loaded = getattr(images, "loaded", None)
    if loaded is not None:
        return loaded(uri, task_id)
    return contextlib.nullcontext(images.load(uri, task_id))
