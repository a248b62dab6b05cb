"""Trying a fetch again after a transient failure, within the fetch's total deadline.

Used by every download (backends/label_studio/client.py: Label Studio and allow-listed hosts) and by
direct GCS reads (backends/images/fetcher.py): connection errors, timeouts, 429 and 5xx are worth
another attempt; anything else fails at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from backends.errors import BackendError
from backends.images.fetch_guard import Deadline

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_BACKOFF_S = 0.25  # first retry delay, doubled for each further retry


class Retryable(Exception):
    """A failure worth another attempt (connection error, timeout, 5xx); `error` is raised at the end."""

    def __init__(self, error: BackendError):
        super().__init__(error.message)
        self.error = error


def retrying(attempt: Callable[[], T], name: str, attempts: int, deadline: Deadline, backoff_s: float) -> T:
    """`attempt()` until it returns, at most `attempts` times; only `Retryable` failures are tried
    again (after `backoff_s` seconds, doubled each time, while the deadline leaves time for it), and
    the last one raises its error. `name` (an image, for messages) is only logged."""
    failures = 0
    while True:
        try:
            return attempt()
        except Retryable as exc:
            failures += 1
            delay = backoff_s * 2 ** (failures - 1)
            if failures >= attempts or deadline.remaining() <= delay:
                raise exc.error from None
            log.info("fetching %s failed (%s); retry %d of %d in %.2f s", name, exc, failures, attempts - 1, delay)
            time.sleep(delay)
