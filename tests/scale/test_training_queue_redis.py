"""The training queue's pieces against a real redis-server (no worker, no Label Studio): one job
per project, the queue's bound, what /health reads back (hostile values included), the run lock,
and Redis down. The whole path with workers is in test_training_queue_workers.py."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backends.errors import Overloaded, TooManyRequests
from backends.settings import Settings
from devstack.processes import free_port
from segmentation.job_queue import (
    LOCK_TTL_S,
    MAX_STATUS_CHARS,
    TrainingJobs,
    connect,
    job_id_of,
    key_of,
    parse_status,
)
from segmentation.training_job import checked_project, report_lost
from segmentation.worker import ABANDONED_AFTER_S, HEARTBEAT_S, TrainingWorker

DB = 3  # apart from the other suites' keys in the session's redis-server


@pytest.fixture
def redis_url(redis_server) -> str:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    redis.Redis.from_url(url).flushdb()
    return url


def training_jobs(url: str, **fields) -> TrainingJobs:
    settings = dataclasses.replace(Settings(), redis_url=url, **fields)
    return TrainingJobs(connect(url, 0.5), settings)


def job_of(jobs: TrainingJobs, project: str) -> Job:
    return Job.fetch(job_id_of(project), connection=jobs.redis, serializer=JSONSerializer)


def test_a_project_is_queued_once_and_its_status_is_shared(redis_url):
    jobs = training_jobs(redis_url)
    assert jobs.submit("7", "<View/>", "START_TRAINING") == "queued"
    assert jobs.submit("7", "<View/>", "START_TRAINING") == "already queued"
    assert jobs.submit("8", None, "ANNOTATION_CREATED") == "queued"
    assert jobs.queue.count == 2 and jobs.position("8") == 2 and jobs.position("9") is None
    job = job_of(jobs, "7")
    assert job.args == ["7", "<View/>", "START_TRAINING"] and job.retries_left == 1
    # Another replica (its own client) sees the same queue and status.
    other = training_jobs(redis_url)
    queue, statuses = other.health(["7", "9"])
    assert queue == {"backend": "redis", "waiting": 2, "running": 0, "workers": 0, "max_waiting": 8}
    assert statuses["7"]["state"] == "queued" and statuses["7"]["reason"] == "START_TRAINING"
    assert "9" not in statuses


def test_a_running_job_answers_already_running_and_a_finished_one_is_replaced(redis_url):
    jobs = training_jobs(redis_url)
    assert jobs.submit("7", None, "START_TRAINING") == "queued"
    job_of(jobs, "7").set_status(JobStatus.STARTED)
    assert jobs.submit("7", None, "START_TRAINING") == "already running"
    for ended in (JobStatus.FAILED, JobStatus.FINISHED):
        job_of(jobs, "7").set_status(ended)
        assert jobs.submit("7", None, "START_TRAINING") == "queued"
        assert job_of(jobs, "7").get_status() == JobStatus.QUEUED
    assert jobs.redis.lrange(jobs.queue.key, 0, -1).count(job_id_of("7").encode()) == 1


def test_beyond_train_queue_max_the_webhook_is_refused_with_a_message(redis_url):
    jobs = training_jobs(redis_url, train_queue_max=2)
    assert [jobs.submit(p, None, "START_TRAINING") for p in ("1", "2")] == ["queued", "queued"]
    with pytest.raises(TooManyRequests, match="TRAIN_QUEUE_MAX=2"):
        jobs.submit("3", None, "START_TRAINING")
    assert jobs.submit("1", None, "START_TRAINING") == "already queued"  # not refused: nothing is added


def test_annotations_are_counted_for_all_replicas(redis_url):
    first, second = training_jobs(redis_url), training_jobs(redis_url)
    assert [first.count_annotation("4"), second.count_annotation("4"), first.count_annotation("4")] == [1, 2, 3]
    second.reset_annotations("4")
    assert first.count_annotation("4") == 1
    assert first.statuses(["4"])["4"]["new_annotations"] == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b'"training"',
        b"{" * 100_000,
        json.dumps({"state": "x" * 70_000}).encode(),
        b"\xff\xfe",
    ],
)
def test_a_status_that_is_not_a_small_json_object_reads_as_nothing(raw):
    assert parse_status(raw) in ({}, {"state": "unknown"})


def test_a_hostile_status_is_reduced_to_known_bounded_fields(redis_url):
    jobs = training_jobs(redis_url)
    hostile = {
        "state": "<script>",
        "epoch": 1e400,  # json.dumps writes Infinity
        "loss": float("nan"),
        "error": "e" * 10_000,
        "problems": ["p"] * 1000,
        "val_dice": {"a": {"b": {"c": {"d": 1}}}},
        "secret_field": "token",
        "step": 2**80,
    }
    jobs.redis.set(key_of("5", "status"), json.dumps(hostile))
    jobs.redis.set(key_of("5", "annotations"), b"-3")
    report = jobs.statuses(["5"])["5"]
    assert report["state"] == "unknown"
    assert "secret_field" not in report and "new_annotations" not in report
    assert report.get("epoch") is None and report.get("loss") is None and report.get("step") is None
    assert len(report["error"]) == MAX_STATUS_CHARS and len(report["problems"]) == 64
    assert report["val_dice"] == {"a": {"b": None}}


def test_a_status_with_numbers_json_lacks_is_published_with_nulls(redis_url):
    jobs = training_jobs(redis_url)
    status = dataclasses.replace(jobs_status(), loss=float("nan"), val_dice={"Nucleus": float("inf"), "Cell": 0.5})
    jobs.publish("9", status)
    report = jobs.statuses(["9"])["9"]
    assert report["val_dice"] == {"Nucleus": None, "Cell": 0.5} and "loss" not in report


def test_a_training_run_whose_lock_is_gone_says_so(redis_url):
    jobs = training_jobs(redis_url)
    jobs.publish("6", dataclasses.replace(jobs_status(), state="training"))
    assert "no worker holds this run" in jobs.statuses(["6"])["6"]["note"]
    jobs.redis.set(key_of("6", "lock"), "token", px=5_000)
    assert "note" not in jobs.statuses(["6"])["6"]


def jobs_status():
    from segmentation.service import TrainingStatus

    return TrainingStatus(state="queued", reason="START_TRAINING", queued=time.time())


def test_the_run_lock_admits_one_holder_and_expires_after_its_holder_stops_renewing(redis_url):
    connection = connect(redis_url, 1.0)
    first = connection.lock(key_of("7", "lock"), timeout=0.3, blocking=False, thread_local=False)
    second = connection.lock(key_of("7", "lock"), timeout=0.3, blocking=False, thread_local=False)
    assert first.acquire() and not second.acquire()
    first.reacquire()
    assert not second.acquire()
    time.sleep(0.4)  # the holder "died": no renewal
    assert second.acquire()
    assert LOCK_TTL_S <= 30  # a killed worker's project is free again within half a minute


def test_a_lost_run_is_reported_queued_again_while_it_has_retries_then_failed(redis_url):
    jobs = training_jobs(redis_url)
    jobs.submit("8", None, "START_TRAINING")
    job = job_of(jobs, "8")
    report_lost(jobs.redis, job, "the worker running it stopped")
    status = jobs.statuses(["8"])["8"]
    assert status["state"] == "queued" and "queued again" in status["note"]
    job.retries_left = 0
    report_lost(jobs.redis, job, "the worker running it stopped")
    status = jobs.statuses(["8"])["8"]
    assert status["state"] == "failed" and status["error"] == "the worker running it stopped"


def test_job_arguments_from_redis_are_checked():
    assert checked_project("12") == "12"
    for bad in ("../x", "", "1" * 20, 12, None, "1 2"):
        with pytest.raises(ValueError):
            checked_project(bad)


def test_a_killed_worker_s_job_counts_as_abandoned_after_seconds_not_minutes(redis_url):
    worker = TrainingWorker.__new__(TrainingWorker)
    worker.job_monitoring_interval = HEARTBEAT_S
    job = Job(id="x", connection=redis.Redis.from_url(redis_url))
    job.timeout = 3600
    assert worker.get_heartbeat_ttl(job) == HEARTBEAT_S + ABANDONED_AFTER_S <= 30


def test_redis_down_gives_a_503_for_the_webhook_and_a_degraded_queue_in_health():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    jobs = training_jobs(url)
    started = time.monotonic()
    with pytest.raises(Overloaded, match="REDIS_URL") as raised:
        jobs.submit("1", None, "START_TRAINING")
    assert url not in str(raised.value)
    with pytest.raises(Overloaded):
        jobs.count_annotation("1")
    queue, statuses = jobs.health(["1"])
    assert "error" in queue and statuses == {}
    assert jobs.position("1") is None
    assert time.monotonic() - started < 5
