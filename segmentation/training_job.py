"""What an RQ worker does with one training job (segmentation/worker.py runs the process).

`run_job(project, label_config, reason)` is the job a serving replica enqueues
(segmentation/job_queue.py). It runs in the worker's forked work horse: it reads the settings the
worker was started with, takes the project's run lock (one run per project across all workers),
runs segmentation/training_run.py exactly as the in-process queue does, and publishes the run's
TrainingStatus to Redis as it goes (progress at most once per PUBLISH_EVERY_S). The new version is
promoted atomically in the shared MODEL_DIR; serving replicas pick it up by polling `current`.

`job_failed` and `horse_killed` report runs that ended outside this code (a worker killed, a job
abandoned): "queued" again while RQ has retries left (TRAIN_RETRIES), else "failed".
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from rq import get_current_job
from rq.job import Job

from backends.devices import resolve_device
from backends.images.fetcher import ImageFetcher
from backends.label_studio.client import LabelStudioClient
from backends.label_studio.label_config import LabelConfig, parse_label_config
from backends.settings import Settings
from segmentation.data import SampleStore
from segmentation.job_queue import LOCK_RENEW_S, LOCK_TTL_S, connect, key_of, publish_status
from segmentation.service import TrainingStatus
from segmentation.trainer import Progress
from segmentation.training_run import (
    collect_samples,
    labelled_tasks,
    progress_fields,
    project_label_config,
    run_training,
    short,
)

log = logging.getLogger(__name__)

PUBLISH_EVERY_S = 1.0
REDIS_TIMEOUT_S = 5.0  # the worker's own calls (lock, status): it is not answering anyone meanwhile
SCRATCH_DIR = Path(tempfile.gettempdir()) / "segmentation-worker"  # decoded samples, local to the worker
_PROJECT_ID = re.compile(r"\d{1,19}")


def checked_project(project: Any) -> str:
    """A project id from a job (Redis is input like any other): digits only, or ValueError."""
    if not isinstance(project, str) or not _PROJECT_ID.fullmatch(project):
        raise ValueError(f"not a project id: {ascii(project)[:40]}")
    return project


class StatusPublisher:
    """The run's TrainingStatus, kept here and written to Redis: every change of state at once,
    progress at most every PUBLISH_EVERY_S. A Redis error is logged, never raised: the run goes on."""

    def __init__(self, connection: redis.Redis, project: str, status: TrainingStatus):
        self._redis = connection
        self._project = project
        self.status = status
        self._published = float("-inf")
        self._lock = threading.Lock()

    def report(self, **fields: Any) -> None:
        with self._lock:
            self.status = self.status.updated(**fields)
        self._publish(force="state" in fields or "samples" in fields)

    def progress(self, progress: Progress) -> None:
        with self._lock:
            self.status = self.status.updated(**progress_fields(progress))
        self._publish(force=False)

    def _publish(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._published < PUBLISH_EVERY_S:
            return
        self._published = now
        try:
            publish_status(self._redis, self._project, self.status)
        except (redis.RedisError, TypeError, ValueError) as error:  # the run matters more than its status
            log.warning("could not publish the training status to Redis: %s", error)


class LockRenewal:
    """Keeps a held redis-py Lock alive (LOCK_TTL_S) from a daemon thread, every LOCK_RENEW_S."""

    def __init__(self, lock: Any):
        self._lock = lock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="run-lock", daemon=True)

    def __enter__(self) -> LockRenewal:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=REDIS_TIMEOUT_S)
        try:
            self._lock.release()
        except redis.RedisError as error:  # expired or taken: nothing of ours to release
            log.warning("run lock not released: %s", error)

    def _renew(self) -> None:
        while not self._stop.wait(LOCK_RENEW_S):
            try:
                self._lock.reacquire()
            except redis.RedisError as error:  # lost (expired while Redis was away): the run goes on
                log.warning("run lock not renewed: %s", error)


@dataclass
class WorkerRun:
    """One job's run: the worker's settings and clients, and the project it trains."""

    settings: Settings
    project: str
    label_config: str | None
    reason: str

    def train(self, publisher: StatusPublisher) -> None:
        settings = self.settings
        label_studio = LabelStudioClient(settings)
        images = ImageFetcher(settings, label_studio)
        device = resolve_device(settings.device)
        parsed: dict[str, LabelConfig] = {}

        def labels_of() -> tuple[str, ...]:
            config = self.label_config or project_label_config(label_studio, self.project)
            parsed["config"] = parse_label_config(
                config, max_kb=settings.label_config_max_kb, max_depth=settings.label_config_max_depth
            )
            return parsed["config"].output_labels()

        def collect(labels: tuple[str, ...], store: SampleStore):
            return collect_samples(
                parsed["config"],
                labelled_tasks(label_studio, self.project),
                labels,
                lambda uri, task_id: images.load(uri, task_id).pixels,
                store,
                max_polygon_vertices=settings.polygon_max_vertices,
            )

        run_training(
            self.project,
            labels_of,
            Path(settings.model_dir) / f"project-{self.project}",
            settings,
            device,
            collect=collect,
            report=publisher.report,
            on_progress=publisher.progress,
            samples_parent=SCRATCH_DIR / str(os.getpid()),
        )


def run_job(project: str, label_config: str | None, reason: str) -> None:
    """The RQ job: train `project` unless another worker is training it now."""
    settings = Settings.from_env()
    project = checked_project(project)
    if label_config is not None and (
        not isinstance(label_config, str) or len(label_config) > settings.label_config_max_kb * 1024
    ):
        label_config = None  # ask Label Studio instead
    reason = short(reason) if isinstance(reason, str) else "START_TRAINING"
    connection = connect(settings.redis_url, REDIS_TIMEOUT_S)
    lock = connection.lock(key_of(project, "lock"), timeout=LOCK_TTL_S, blocking=False, thread_local=False)
    job = get_current_job()
    queued = job.enqueued_at.timestamp() if job is not None and job.enqueued_at else None
    status = TrainingStatus(state="training", reason=reason, queued=queued, started=time.time(), epoch=0)
    publisher = StatusPublisher(connection, project, status)
    # A run retried after its worker died may find that worker's lock: it expires within LOCK_TTL_S.
    if not lock.acquire(blocking=True, blocking_timeout=LOCK_TTL_S + LOCK_RENEW_S):
        publisher.report(state="failed", error="another run of this project is still running on another worker")
        log.warning("project %s: not trained, another worker holds its run lock", project)
        return
    with LockRenewal(lock):
        publisher.report(state="training")
        log.info("project %s: training (%s)", project, reason)
        try:
            WorkerRun(settings, project, label_config, reason).train(publisher)
        except Exception as error:  # building the run's clients failed: reported like a failed run
            log.exception("project %s: training failed", project)
            publisher.report(state="failed", error=short(f"{type(error).__name__}: {error}"), finished=time.time())


def report_lost(connection: redis.Redis, job: Job, why: str) -> None:
    """A run ended outside our code: "queued" again while it has retries, else "failed"."""
    try:
        project = checked_project(job.args[0] if job.args else None)
    except (ValueError, TypeError):
        return
    retrying = bool(job.retries_left)
    if retrying:
        status = TrainingStatus(state="queued", queued=time.time(), note=short(f"queued again: {why}"))
    else:
        status = TrainingStatus(state="failed", finished=time.time(), error=short(why))
    try:
        publish_status(connection, project, status)
    except redis.RedisError as error:
        log.warning("project %s: could not publish the lost run's status: %s", project, error)
    log.warning("project %s: training run lost (%s); %s", project, why, "queued again" if retrying else "failed")


def job_failed(job: Job, connection: redis.Redis, kind: Any = None, error: Any = None, traceback: Any = None) -> None:
    """RQ's on_failure callback: the job's worker died (an abandoned job), or the job raised."""
    if kind is None or getattr(kind, "__name__", "") == "AbandonedJobError":
        why = "the worker running it stopped (killed, or lost Redis)"
    else:
        why = f"the job raised {getattr(kind, '__name__', 'an error')}"
    report_lost(connection, job, why)
