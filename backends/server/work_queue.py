"""Bounded background work: a fixed number of worker threads and a bounded waiting line.

`concurrent.futures.ThreadPoolExecutor` queues without limit (every queued job keeps its
arguments, e.g. a whole webhook body, in memory) and its threads keep the process alive at exit.
`BoundedExecutor` has the same `submit` / `shutdown` surface, but refuses work with `QueueFull`
once `workers` jobs run and `max_waiting` wait, and its threads are daemons started on demand.
`KeyedQueue` adds "one job per key": a second submit for a key that is waiting or running is
answered with that job's state instead of queueing a duplicate (one training run per project).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `running` + `waiting` jobs, its capacity: nothing more is accepted."""

    def __init__(self, running: int, waiting: int):
        super().__init__(f"{running} running and {waiting} waiting")
        self.running = running
        self.waiting = waiting


class BoundedExecutor:
    """Runs jobs on at most `workers` daemon threads; at most `max_waiting` jobs wait for one."""

    def __init__(self, workers: int, max_waiting: int, name: str = "background"):
        if workers < 1 or max_waiting < 0:
            raise ValueError(f"need workers >= 1 and max_waiting >= 0, got {workers} and {max_waiting}")
        self.workers = workers
        self.max_waiting = max_waiting
        self.name = name
        self._waiting: collections.deque = collections.deque()
        self._active = 0  # jobs executing now
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def running(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Queue `fn(*args, **kwargs)`; its Future. Raises QueueFull when the line is full and
        RuntimeError after `shutdown`."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: cannot take work after shutdown")
            if self._active + len(self._waiting) >= self.workers + self.max_waiting:
                raise QueueFull(self._active, len(self._waiting))
            self._waiting.append((future, fn, args, kwargs))
            self._start_worker_if_needed()
        return future

    def shutdown(self, wait: bool = False, cancel_futures: bool = True) -> None:
        """Take no more work; cancel what waits (when `cancel_futures`); join workers when `wait`."""
        with self._lock:
            self._closed = True
            dropped = list(self._waiting) if cancel_futures else []
            if cancel_futures:
                self._waiting.clear()
            threads = list(self._threads)
        for future, *_ in dropped:
            future.cancel()
        if wait:
            for thread in threads:
                thread.join()

    def _start_worker_if_needed(self) -> None:
        """Under the lock: one more thread when jobs wait, no thread is idle and the cap allows."""
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        idle = len(self._threads) - self._active
        if len(self._threads) < self.workers and idle < len(self._waiting):
            thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    self._threads = [t for t in self._threads if t is not threading.current_thread()]
                    return
                future, fn, args, kwargs = self._waiting.popleft()
                self._active += 1
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn(*args, **kwargs)
                    except BaseException as error:  # the Future carries it to whoever waits
                        future.set_exception(error)
                    else:
                        future.set_result(result)
            finally:
                with self._lock:
                    self._active -= 1


class KeyedQueue:
    """A BoundedExecutor where each key has at most one job waiting or running."""

    def __init__(self, workers: int, max_waiting: int, name: str):
        self._executor = BoundedExecutor(workers, max_waiting, name)
        self._states: dict[Hashable, str] = {}  # key -> "queued" | "running"
        self._order: list[Hashable] = []  # queued keys, oldest first
        self._lock = threading.Lock()

    @property
    def workers(self) -> int:
        return self._executor.workers

    @property
    def max_waiting(self) -> int:
        return self._executor.max_waiting

    def submit(self, key: Hashable, job: Callable[[], Any]) -> str:
        """Queue `job` for `key`: "queued", or "already queued" / "already running" when the key
        has a job already (nothing is added). Raises QueueFull."""
        with self._lock:
            state = self._states.get(key)
            if state is not None:
                return f"already {state}"
            self._executor.submit(self._run, key, job)  # QueueFull propagates: nothing recorded
            self._states[key] = "queued"
            self._order.append(key)
            return "queued"

    def state(self, key: Hashable) -> str | None:
        """ "queued", "running" or None."""
        with self._lock:
            return self._states.get(key)

    def position(self, key: Hashable) -> int | None:
        """1 for the next job to start, None when `key` is not waiting."""
        with self._lock:
            return self._order.index(key) + 1 if key in self._order else None

    def counts(self) -> tuple[int, int]:
        """(running, waiting) jobs."""
        with self._lock:
            running = sum(1 for state in self._states.values() if state == "running")
            return running, len(self._states) - running

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for key in self._order:
                self._states.pop(key, None)
            self._order.clear()

    def _run(self, key: Hashable, job: Callable[[], Any]) -> None:
        with self._lock:
            self._states[key] = "running"
            if key in self._order:
                self._order.remove(key)
        try:
            job()
        except Exception:  # a job reports its own failures; this is the last line
            log.exception("background job for %s failed", key)
        finally:
            with self._lock:
                self._states.pop(key, None)
