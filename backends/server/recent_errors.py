"""The last warnings and errors a backend logged, for its status page.

`RecentErrors` is a logging handler the server owns and attaches to the root logger while it runs:
it keeps the newest `capacity` records at WARNING or above (error answers, failed background jobs,
failed training runs), each message redacted like a log line (backends.logs.redact) and cut short,
so the page never shows a token or a whole request.
"""

from __future__ import annotations

import collections
import logging
import threading

from backends.logs import redact, truncate

MAX_ERROR_CHARS = 500


class RecentErrors(logging.Handler):
    """A bounded ring buffer of log records at `level` or above, as plain dicts."""

    def __init__(self, capacity: int = 50, level: int = logging.WARNING):
        super().__init__(level)
        self._records: collections.deque[dict] = collections.deque(maxlen=capacity)
        self._records_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                error = record.exc_info[1]
                message += f" ({type(error).__name__}: {error})"
            entry = {
                "time": record.created,
                "level": record.levelname,
                "logger": record.name,
                "message": truncate(redact(message[: 4 * MAX_ERROR_CHARS]), MAX_ERROR_CHARS),
            }
        except Exception:  # a record that cannot be formatted must not break the caller's logging
            self.handleError(record)
            return
        with self._records_lock:
            self._records.append(entry)

    def entries(self) -> list[dict]:
        """The records kept, newest first."""
        with self._records_lock:
            return list(reversed(self._records))
