"""Training through the Redis queue with real processes: Label Studio 1.23, a redis-server, one
serving `python -m segmentation` replica (REDIS_URL set) and two `python -m segmentation.worker`
processes sharing MODEL_DIR.

Three projects press "Start training" at once: the webhook answers at once, each project trains
exactly once on one of the two workers, each version is promoted atomically and the serving replica
serves it without a restart. Then a worker is killed (kill -9, its work horse too) in the middle of
a run: the run is queued again and finished by the other worker, and the served model stays the
previous complete version until then.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import requests
from PIL import Image

from devstack.processes import ManagedProcess, child_env, spawn
from segmentation.job_queue import QUEUE_NAME
from segmentation.versions import INCOMPLETE_PREFIX, current_version, list_versions, load_version, save_version
from tests.support.images import cells
from tests.support.payloads import BRUSH_CONFIG, brush

pytestmark = pytest.mark.e2e

DB = 4  # apart from the other suites' keys in the session's redis-server
N_PROJECTS = 3
N_IMAGES = 4
SIZE = (64, 64)
SETTINGS = {
    "DEVICE": "cpu",
    "TRAIN_MINUTES": "0.1",  # 6 s of training per run on this 2-core machine
    "TRAIN_EVERY": "1000",  # only "Start training" trains
    "VAL_FRACTION": "0.25",
    "TRAIN_RETRIES": "1",
    "SEG_VERSION_POLL_S": "0.5",
    "OMP_NUM_THREADS": "1",  # three processes share 2 cores
    "LOG_LEVEL": "INFO",
}
DEADLINE_S = 150.0
RUN_STARTED = "training (START_TRAINING)"  # the worker's log line when a run starts


def backend_call(method: str, url: str, **kwargs) -> requests.Response:
    with requests.Session() as session:
        session.trust_env = False
        return session.request(method, url, timeout=30, **kwargs)


def start_worker(name: str, env: dict[str, str], home: Path) -> ManagedProcess:
    argv = [sys.executable, "-m", "segmentation.worker", "--name", name]
    worker_env = child_env({"PYTHONUNBUFFERED": "1", **env, "IMAGE_CACHE_DIR": str(home / name / "image-cache")})
    return spawn(name, argv, worker_env, home / "logs" / f"{name}.log")


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (the worker's forked work horse)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def make_project(label_studio, tmp_path: Path, index: int) -> tuple[int, list[int]]:
    """A BrushLabels project of N_IMAGES synthetic cell images, every task annotated; (id, task ids)."""
    ls = label_studio.ls
    project = ls.projects.create(title=f"queue {index}", label_config=BRUSH_CONFIG)
    paths, truths = [], []
    for image_index in range(N_IMAGES):
        image, truth = cells(100 * index + image_index, SIZE, disks=3, margin=10, radii=(5, 9))
        path = tmp_path / f"p{index}-{image_index}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
        truths.append(truth)
    task_ids = label_studio.upload_files(project.id, paths)
    for task_id, truth in zip(task_ids, truths, strict=True):
        ls.annotations.create(id=task_id, result=[brush(truth)])
    return project.id, task_ids


class Watch:
    """Polls the serving replica's /health in the background and records each project's states."""

    def __init__(self, url: str):
        self.url = url
        self.states: dict[str, list[str]] = {}
        self.last: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            try:
                health = backend_call("GET", f"{self.url}/health").json()
            except (requests.RequestException, ValueError):
                continue
            self.last = health
            for project, report in health.get("projects", {}).items():
                seen = self.states.setdefault(project, [])
                if not seen or seen[-1] != report.get("state"):
                    seen.append(report.get("state"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def predict_version(backend_url: str, project: int, task: dict) -> str:
    body = {"tasks": [task], "project": f"{project}.0", "label_config": BRUSH_CONFIG}
    response = backend_call("POST", f"{backend_url}/predict", json=body)
    assert response.status_code == 200, response.text[:300]
    results = response.json()["results"]
    return results[0]["model_version"] if results else "untrained"


def wait_until(condition, deadline_s: float, what: str, details=lambda: "") -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {details()}"
        time.sleep(0.2)


def test_two_workers_train_three_projects_once_each_and_survive_a_killed_worker(
    label_studio, redis_server, start_backend, stack_dir, tmp_path
):
    redis_url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    model_dir = tmp_path / "shared-models"
    env = {
        **SETTINGS,
        "REDIS_URL": redis_url,
        "MODEL_DIR": str(model_dir),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
    }
    projects = [make_project(label_studio, tmp_path, index) for index in range(N_PROJECTS)]
    backend = start_backend("segmentation", env=env)
    workers = {name: start_worker(name, env, tmp_path) for name in ("w1", "w2")}
    watch = Watch(backend.url)
    try:
        started = time.monotonic()
        run_three_projects(label_studio, backend, workers, projects, model_dir, watch)
        print(f"three projects trained in {time.monotonic() - started:.0f} s")
        kill_a_worker_mid_run(label_studio, backend, workers, projects[0], model_dir, watch, connection)
    finally:
        watch.stop()
        for worker in workers.values():
            worker.stop()


def run_three_projects(label_studio, backend, workers, projects, model_dir: Path, watch: Watch) -> None:
    ls = label_studio.ls
    tasks = {pid: label_studio.http.get(f"{label_studio.url}/api/tasks/{ids[0]}").json() for pid, ids in projects}
    for pid, _ in projects:  # nothing trained yet: no prediction
        assert predict_version(backend.url, pid, tasks[pid]) == "untrained"
    mls = {pid: ls.ml.create(project=pid, url=backend.url, title="U-Net (queue)") for pid, _ in projects}
    wait_until(
        lambda: backend_call("GET", f"{backend.url}/health").json()["training_queue"].get("workers", 0) >= 2,
        60,
        "both workers to register",
    )

    # --- "Start training" in three projects at once, through Label Studio
    answers: dict[int, float] = {}

    def press(pid: int) -> None:
        started = time.monotonic()
        ls.ml.train(id=mls[pid].id)
        answers[pid] = time.monotonic() - started

    threads = [threading.Thread(target=press, args=(pid,)) for pid, _ in projects]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    again = backend_call(
        "POST",
        f"{backend.url}/webhook",
        json={"action": "START_TRAINING", "project": {"id": projects[0][0], "label_config": BRUSH_CONFIG}},
    )
    assert again.status_code == 200 and again.json()["training"] in {"already queued", "already running"}, again.text
    assert again.elapsed.total_seconds() < 1.0, again.elapsed  # Label Studio waits 1 s for a webhook
    print(f"Start training through Label Studio answered in {sorted(round(s, 2) for s in answers.values())} s")

    # --- each project trains once; the replica serves each new version without a restart
    def all_trained() -> bool:
        return all(current_version(model_dir / f"project-{pid}") for pid, _ in projects)

    wait_until(all_trained, DEADLINE_S, "three trained versions", lambda: str(watch.last.get("projects")))
    for pid, _ in projects:
        folder = model_dir / f"project-{pid}"
        versions = list_versions(folder)
        assert len(versions) == 1, [v.version for v in versions]  # trained once
        assert not [p for p in folder.iterdir() if p.name.startswith(INCOMPLETE_PREFIX)]
        wait_until(
            lambda pid=pid, version=versions[0].version: predict_version(backend.url, pid, tasks[pid]) == version,
            10,
            f"project {pid} to be served its new version",
        )
    wait_until(
        lambda: all(watch.states.get(str(pid), [""])[-1] == "idle" for pid, _ in projects),
        10,
        "the projects' statuses to say idle",
        lambda: str(watch.states),
    )
    for pid, _ in projects:
        assert "training" in watch.states[str(pid)], watch.states  # progress came through Redis
        report = watch.last["projects"][str(pid)]
        assert (
            report["samples"] == N_IMAGES
            and report["model_version"] == list_versions(model_dir / f"project-{pid}")[0].version
        ), report
    trained_by = {name: worker.log_path.read_text().count(RUN_STARTED) for name, worker in workers.items()}
    assert sum(trained_by.values()) == N_PROJECTS and all(trained_by.values()), trained_by  # both workers worked

    # --- a version promoted by any other process (here: this one, as the offline CLI would) is
    # served within SEG_VERSION_POLL_S
    pid = projects[-1][0]
    folder = model_dir / f"project-{pid}"
    model = load_version(list_versions(folder)[0].path)
    info = save_version(folder, model.network.state_dict(), labels=model.info.labels, network=model.info.network)
    promoted = time.monotonic()
    wait_until(lambda: predict_version(backend.url, pid, tasks[pid]) == info.version, 10, "the replica to switch")
    pickup_s = time.monotonic() - promoted
    assert pickup_s < float(SETTINGS["SEG_VERSION_POLL_S"]) + 2.0
    print(f"a version promoted by another process was served {pickup_s:.2f} s later (SEG_VERSION_POLL_S=0.5)")


def kill_a_worker_mid_run(label_studio, backend, workers, project, model_dir: Path, watch: Watch, connection) -> None:
    pid, task_ids = project
    folder = model_dir / f"project-{pid}"
    served = current_version(folder)
    versions_before = len(list_versions(folder))
    task = label_studio.http.get(f"{label_studio.url}/api/tasks/{task_ids[0]}").json()
    answer = backend_call(
        "POST", f"{backend.url}/webhook", json={"action": "START_TRAINING", "project": {"id": pid}}
    ).json()
    assert answer["training"] == "queued", answer

    def training_step() -> bool:
        report = watch.last.get("projects", {}).get(str(pid), {})
        return report.get("state") == "training" and report.get("step", 0) >= 1

    wait_until(training_step, 60, "the run to be training", lambda: str(watch.last.get("projects")))
    states_before = len(watch.states[str(pid)])
    runs_before = {name: worker.log_path.read_text().count(RUN_STARTED) for name, worker in workers.items()}
    victim = next(
        name for name, worker in workers.items() if children_of(worker.pid)
    )  # the worker whose work horse runs it
    horse = children_of(workers[victim].pid)
    killed_at = time.monotonic()
    for process in [workers[victim].pid, *horse]:
        os.kill(process, signal.SIGKILL)
    assert predict_version(backend.url, pid, task) == served  # the served model is intact

    def finished_again() -> bool:
        return (
            len(list_versions(folder)) == versions_before + 1
            and watch.last["projects"][str(pid)].get("state") == "idle"
        )

    wait_until(
        finished_again,
        DEADLINE_S,
        "the run to be retried and finish",
        lambda: (
            f"{watch.states.get(str(pid))} {watch.last['projects'][str(pid)]}\n"
            + "\n".join(f"{name}: {worker.log_tail(15)}" for name, worker in workers.items())
        ),
    )
    retried_in = time.monotonic() - killed_at
    states = watch.states[str(pid)][states_before - 1 :]
    assert states[0] == "training" and states[-1] == "idle", states
    new = current_version(folder)
    assert new != served and [v.version for v in list_versions(folder)][-1] == new
    wait_until(lambda: predict_version(backend.url, pid, task) == new, 10, "the retried version to be served")
    survivor = next(name for name in workers if name != victim)
    survivor_log = workers[survivor].log_path.read_text()
    assert f"project {pid}: training run lost" in survivor_log, survivor_log[-3000:]  # RQ found it abandoned
    assert "queued again" in survivor_log, survivor_log[-3000:]
    assert survivor_log.count(RUN_STARTED) == runs_before[survivor] + 1
    assert connection.llen(f"rq:queue:{QUEUE_NAME}") == 0
    print(f"killed worker's run retried and finished on {survivor} in {retried_in:.0f} s; states {states}")
