"""The training queue on Redis (REDIS_URL set): RQ jobs, one run per project, status for /health.

Serving replicas enqueue (`TrainingJobs.submit`), `python -m segmentation.worker` processes run the
jobs (segmentation/worker.py), and every replica reads the runs' status back for /health. What
lives in Redis, per project P:

    rq:job:seg-train-P                     the RQ job (JSON-serialised): one id per project, enqueued
                                           with `unique=True`, so a project is never queued twice
    segmentation:training:P:lock           held by the worker running P (redis-py's Lock: a token,
                                           LOCK_TTL_S, renewed every LOCK_RENEW_S): one run per
                                           project across workers; it expires soon after a kill -9
    segmentation:training:P:status         the run's TrainingStatus as JSON (STATUS_TTL_S)
    segmentation:training:P:annotations    new annotations since the last run (TRAIN_EVERY), shared
                                           by the replicas behind one URL

A job whose worker dies is RQ's "abandoned job": its heartbeat stops, a worker's maintenance finds
it and queues it again (TRAIN_RETRIES) or fails it; segmentation/worker.py tunes those intervals
to seconds and reports either outcome in the status. Everything read back from Redis is checked
like a request body: bounded, known fields, expected types.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import redis
from rq import Callback, Queue, Retry
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import Worker

from backends.errors import Overloaded, TooManyRequests
from backends.settings import Settings
from segmentation.service import TrainingStatus

log = logging.getLogger(__name__)

QUEUE_NAME = "segmentation-training"
JOB_FUNCTION = "segmentation.training_job.run_job"
#: Called by RQ when a run fails outside our code: its worker died (an abandoned job, found by a
#: worker's maintenance) or it raised. Runs in a worker process.
JOB_FAILED_CALLBACK = "segmentation.training_job.job_failed"
KEY_PREFIX = "segmentation:training"
LOCK_TTL_S = 20.0  # a killed worker's lock is gone this long after its last renewal
LOCK_RENEW_S = 5.0
STATUS_TTL_S = 7 * 86400
FINISHED_TTL_S = 3600  # a finished job's record (its status key says more, for longer)
COUNTER_TTL_S = 7 * 86400
STALE_WRITE_S = 600.0  # a half-written version older than this is a leftover, not a write in progress
DATA_MINUTES = 60.0  # a job's time limit beyond TRAIN_MINUTES: fetching and decoding the annotated tasks
MAX_STATUS_BYTES = 64 * 1024
MAX_STATUS_ITEMS = 64  # entries of a list or dict field (labels, problems)
MAX_STATUS_CHARS = 300  # per string
STATES = ("idle", "queued", "training", "failed")
_QUEUED = {JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED}


def connect(redis_url: str, timeout_s: float) -> redis.Redis:
    """A client of REDIS_URL whose calls fail after `timeout_s` (Redis down must not hang a webhook
    or /health); it connects on first use."""
    return redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def job_id_of(project: str) -> str:
    return f"seg-train-{project or 'default'}"


def key_of(project: str, what: str) -> str:
    return f"{KEY_PREFIX}:{project or 'default'}:{what}"


def job_timeout_s(settings: Settings) -> int:
    """RQ's time limit for one run: TRAIN_MINUTES plus DATA_MINUTES for the data."""
    return int((settings.train_minutes + DATA_MINUTES) * 60)


def training_queue(connection: redis.Redis) -> Queue:
    return Queue(QUEUE_NAME, connection=connection, serializer=JSONSerializer)


class TrainingJobs:
    """The serving replica's side of the queue: submit runs, count annotations, read statuses.
    Redis errors become `Overloaded` (503) for a webhook and a DEGRADED /health."""

    def __init__(self, connection: redis.Redis, settings: Settings):
        self.redis = connection
        self.queue = training_queue(connection)
        self.max_waiting = settings.train_queue_max
        self.retries = settings.train_retries
        self.timeout_s = job_timeout_s(settings)

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainingJobs:
        return cls(connect(settings.redis_url, settings.redis_timeout_s), settings)

    # -- webhooks ----------------------------------------------------------------------------

    def submit(self, project: str, label_config: str | None, reason: str) -> str:
        """Enqueue a run of `project`: "queued", or "already queued" / "already running" when its
        job waits or runs (nothing is added). TooManyRequests when TRAIN_QUEUE_MAX runs wait."""
        try:
            for _ in range(2):  # a finished or failed job of the project is replaced once
                outcome = self._try_submit(project, label_config, reason)
                if outcome is not None:
                    return outcome
            return "already queued"  # another replica replaced it meanwhile
        except redis.RedisError as error:
            raise self._unavailable(f"{reason} for project {project or '-'} was not queued", error) from None

    def _try_submit(self, project: str, label_config: str | None, reason: str) -> str | None:
        job_id = job_id_of(project)
        state = self._job_state(job_id)
        if state is not None:
            return f"already {state}"
        if self.queue.count >= self.max_waiting:
            raise TooManyRequests(
                f"the training queue is full: {self.queue.count} runs waiting (TRAIN_QUEUE_MAX={self.max_waiting}); "
                f"{reason} for project {project or '-'} was not queued, send it again later"
            )
        with contextlib.suppress(NoSuchJobError):
            Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer).delete()  # finished or failed
        # Published first: the worker's "training" must not be overwritten by a late "queued".
        self.publish(project, TrainingStatus(state="queued", reason=reason, queued=time.time()))
        try:
            self.queue.enqueue_call(
                JOB_FUNCTION,
                args=(project, label_config, reason),
                job_id=job_id,
                unique=True,  # atomic: a job of this project that exists wins
                timeout=self.timeout_s,
                retry=Retry(max=self.retries) if self.retries else None,
                # Kept a while (`rq info`); 0 would delete it at once, which fails in RQ 3.0 for a job
                # whose first execution was abandoned (it fetches the expired execution).
                result_ttl=FINISHED_TTL_S,
                failure_ttl=STATUS_TTL_S,
                on_failure=Callback(JOB_FAILED_CALLBACK),
                description=f"train project {project or '-'}",
            )
        except DuplicateJobError:  # another replica queued it a moment ago
            return None
        return "queued"

    def _job_state(self, job_id: str) -> str | None:
        """ "queued", "running", or None when the project has no live job."""
        try:
            status = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer).get_status()
        except NoSuchJobError:
            return None
        if status in _QUEUED:
            return "queued"
        return "running" if status == JobStatus.STARTED else None

    def position(self, project: str) -> int | None:
        """1 for the next run to start, None when the project does not wait (or Redis is down)."""
        try:
            index = self.queue.get_job_position(job_id_of(project))
        except redis.RedisError:
            return None
        return None if index is None else int(index) + 1

    def count_annotation(self, project: str) -> int:
        """One more new annotation of `project`, counted for all replicas; the count."""
        key = key_of(project, "annotations")
        try:
            with self.redis.pipeline() as pipe:
                pipe.incr(key)
                pipe.expire(key, COUNTER_TTL_S)
                count, _ = pipe.execute()
        except redis.RedisError as error:
            raise self._unavailable(f"the annotation of project {project or '-'} was not counted", error) from None
        return int(count)

    def reset_annotations(self, project: str) -> None:
        try:
            self.redis.delete(key_of(project, "annotations"))
        except redis.RedisError:
            log.warning("project %s: could not reset the annotation count in Redis", project or "-")

    # -- status ------------------------------------------------------------------------------

    def publish(self, project: str, status: TrainingStatus) -> None:
        publish_status(self.redis, project, status)

    def statuses(self, projects: Iterable[str]) -> dict[str, dict[str, Any]]:
        """For each project with a published status: its checked TrainingStatus fields, the shared
        `new_annotations`, and a note when a run is "training" but no worker holds its lock (the
        worker died: RQ retries or fails the run within a minute). Raises redis.RedisError."""
        projects = list(projects)
        with self.redis.pipeline(transaction=False) as pipe:
            for project in projects:
                pipe.get(key_of(project, "status"))
                pipe.get(key_of(project, "annotations"))
                pipe.exists(key_of(project, "lock"))
            replies = pipe.execute()
        found: dict[str, dict[str, Any]] = {}
        for index, project in enumerate(projects):
            raw, annotations, locked = replies[3 * index : 3 * index + 3]
            report = parse_status(raw) if raw is not None else {}
            count = _small_int(annotations)
            if count is not None:
                report["new_annotations"] = count
            if report.get("state") == "training" and not locked:
                report["note"] = (
                    "no worker holds this run any more (it stopped or lost Redis): "
                    "it is queued again or reported failed shortly"
                )
            if report:
                found[project] = report
        return found

    def health(self, projects: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """(the queue, the projects' statuses) for /health; the queue has an `error` instead when
        Redis does not answer."""
        try:
            return self.counts(), self.statuses(projects)
        except redis.RedisError as error:
            log.warning("Redis (training queue) failed: %s: %s", type(error).__name__, error)
            return {
                "backend": "redis",
                "error": f"Redis does not answer ({type(error).__name__}): training cannot be queued",
            }, {}

    def counts(self) -> dict[str, Any]:
        """The queue for /health: runs waiting and running, workers listening. Raises redis.RedisError."""
        return {
            "backend": "redis",
            "waiting": self.queue.count,
            # Not `.count`: it would run RQ's abandoned-job cleanup (and its callbacks) in this
            # replica's /health thread; the workers' maintenance does that.
            "running": len(StartedJobRegistry(queue=self.queue).get_job_ids(cleanup=False)),
            "workers": Worker.count(queue=self.queue),
            "max_waiting": self.max_waiting,
        }

    @staticmethod
    def _unavailable(what: str, error: redis.RedisError) -> Overloaded:
        log.warning("Redis (training queue) failed: %s: %s", type(error).__name__, error)
        return Overloaded(f"the training queue (Redis, REDIS_URL) does not answer: {what}; send it again later")


def publish_status(connection: redis.Redis, project: str, status: TrainingStatus) -> None:
    """Store a run's status for every replica's /health (raises redis.RedisError). A number that
    is not finite (a diverged loss, a Dice of an absent label) is stored as null: JSON has no NaN."""
    payload = json.dumps(_finite(status.report()), allow_nan=False, default=str)
    connection.set(key_of(project, "status"), payload, ex=STATUS_TTL_S)


def parse_status(raw: bytes | str) -> dict[str, Any]:
    """A status read from Redis as /health fields: only TrainingStatus's fields, a known state,
    finite numbers, strings cut to MAX_STATUS_CHARS, at most MAX_STATUS_ITEMS per list or dict;
    {} for anything that is not such a JSON object."""
    if len(raw) > MAX_STATUS_BYTES:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    names = {field.name for field in dataclasses.fields(TrainingStatus)}
    report = {}
    for name, value in data.items():
        if name in names:
            cleaned = _clean(value, depth=2)
            if cleaned is not None:
                report[name] = cleaned
    if report.get("state") not in STATES:
        report["state"] = "unknown"
    return report


def _clean(value: Any, depth: int) -> Any:
    """A JSON value bounded in size and depth (None for what does not fit)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**53 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value if len(value) <= MAX_STATUS_CHARS else value[: MAX_STATUS_CHARS - 3] + "..."
    if depth <= 0:
        return None
    if isinstance(value, list):
        return [_clean(item, depth - 1) for item in value[:MAX_STATUS_ITEMS]]
    if isinstance(value, dict):
        items = list(value.items())[:MAX_STATUS_ITEMS]
        return {str(key)[:MAX_STATUS_CHARS]: _clean(item, depth - 1) for key, item in items}
    return None


def _finite(value: Any) -> Any:
    """`value` with every float that is not finite replaced by None (in lists and dicts too)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _small_int(raw: Any) -> int | None:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        return None
    return value if 0 <= value < 2**31 else None
