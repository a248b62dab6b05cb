"""`python -m segmentation.worker`: an RQ worker that runs the segmentation training queue.

    REDIS_URL=redis://redis:6379/0 LABEL_STUDIO_URL=http://label-studio:8080 LABEL_STUDIO_API_KEY=... \\
    MODEL_DIR=/models DEVICE=cuda python -m segmentation.worker [--name gpu0] [--burst]

One worker per GPU (give each its GPU with CUDA_VISIBLE_DEVICES, or DEVICE=cuda:N); all of them
and the serving replicas share MODEL_DIR (a shared volume) and REDIS_URL. Each job runs in a
forked work horse (RQ's default), so a crash, a CUDA error or a kill of the run leaves the worker
listening. The configuration is the serving backend's (backends/settings.py: TRAIN_MINUTES,
VAL_FRACTION, IMAGE_*, TRAIN_RETRIES, LOG_LEVEL, ...); the worker needs LABEL_STUDIO_URL and
LABEL_STUDIO_API_KEY itself, as no /setup reaches it.

A worker killed mid-run (kill -9, a lost node) stops renewing the job's heartbeat: within about
ABANDONED_AFTER_S another worker's maintenance finds the job abandoned and queues it again
(TRAIN_RETRIES) or marks it failed; the project's run lock expires LOCK_TTL_S after its last
renewal. The served model is never touched by a killed run (versions are promoted atomically), and
what the run left (a half-written version, decoded samples) is removed by the next worker to start.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import Worker

from backends.settings import Settings, SettingsError
from segmentation.job_queue import QUEUE_NAME, STALE_WRITE_S, connect, training_queue
from segmentation.service import remove_interrupted_runs
from segmentation.training_job import SCRATCH_DIR, report_lost

log = logging.getLogger(__name__)

HEARTBEAT_S = 5  # a running job's heartbeat (RQ's job monitoring interval)
ABANDONED_AFTER_S = 15  # a job whose heartbeat is older than this counts as abandoned
MAINTENANCE_S = 10  # how often an idle worker looks for abandoned jobs
WORKER_TTL_S = 25  # a worker's registration lives this long without news (idle workers wait 10 s per poll)


class TrainingWorker(Worker):
    """RQ's forking worker with a heartbeat margin of seconds instead of a minute, so a killed
    worker's job is found abandoned (and retried or failed) quickly."""

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        remaining = (job.timeout - working_time) if job.timeout and job.timeout > 0 else self.job_monitoring_interval
        return int(max(min(remaining, self.job_monitoring_interval), 1)) + ABANDONED_AFTER_S


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m segmentation.worker",
        description="Run segmentation training jobs from the Redis queue (REDIS_URL). "
        "Configuration comes from environment variables (see README, Configuration).",
    )
    parser.add_argument("--name", default=None, help="worker name shown by `rq info` (default: host and pid)")
    parser.add_argument("--burst", action="store_true", help="quit once the queue is empty")
    return parser


def check_settings(settings: Settings) -> None:
    """What a worker cannot run without; SettingsError naming the variable."""
    if not settings.redis_url:
        raise SettingsError("REDIS_URL is not set: the worker takes its jobs from Redis")
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise SettingsError(
            "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set: the worker reads annotations from Label Studio"
        )


def remove_leftovers(model_dir: Path, scratch_dir: Path = SCRATCH_DIR) -> None:
    """What killed runs left: half-written versions in the shared MODEL_DIR (old enough not to be
    another worker's write in progress) and decoded samples of work horses that no longer run."""
    remove_interrupted_runs(model_dir, older_than_s=STALE_WRITE_S)
    if not scratch_dir.is_dir():
        return
    for folder in scratch_dir.iterdir():
        if folder.name.isdigit() and not _alive(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)
            log.warning("removed %s, left by an interrupted training run", folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Sequence[str] | None = None) -> None:
    from backends.logs import configure_logging

    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        check_settings(settings)
    except SettingsError as error:
        print(f"segmentation worker: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    remove_leftovers(Path(settings.model_dir))
    connection = connect(settings.redis_url, timeout_s=5.0)
    worker = TrainingWorker(
        [training_queue(connection)],
        name=args.name,
        connection=connection,
        serializer=JSONSerializer,
        job_monitoring_interval=HEARTBEAT_S,
        maintenance_interval=MAINTENANCE_S,
        worker_ttl=WORKER_TTL_S,
        work_horse_killed_handler=lambda job, pid, status, rusage: report_lost(
            connection, job, f"its process stopped (wait status {status})"
        ),
    )
    log.info("segmentation worker %s listening on queue %s", worker.name, QUEUE_NAME)
    worker.work(burst=args.burst, logging_level=settings.log_level)


if __name__ == "__main__":
    main()
