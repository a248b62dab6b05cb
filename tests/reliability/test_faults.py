"""Faults against real processes on loopback: kill -9, Label Studio down, GCS down, image host 500.

- kill -9 of the segmentation backend mid-training: after a restart the last good version is
  served (same model_version, predictions work, nothing half-written listed) and a new run
  trains and is promoted.
- Label Studio down (a stand-in that stops and restarts on the same port): both backends' /health
  say DEGRADED, predictions that need an image fail fast with a message naming Label Studio, and
  everything recovers when it returns.
- An image host answering 500: bounded retries with growing delays (counted at the host), then a
  clear 422; a host that recovers within the retries gives the right mask; a 404 is not retried.
- fake-gcs-server killed in the middle of `import_gcs` (real Label Studio): killed while listing,
  the run fails with a one-line message and imports nothing; killed while reading sidecars, a rerun
  leaves no duplicate tasks and every task keeps its metadata (the first run stops before importing).
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import numpy as np
import pytest

from bench.load import Click, Prompt, TaskImage, click_context, predict_body
from devstack.processes import free_port
from tests.reliability.stack import (
    StandInLabelStudio,
    check_own_mask,
    launch,
    project_state,
    seed_model,
    seg_predict,
    session,
    start_training,
    wait_for,
)
from tests.support.ci import unavailable
from tests.support.engines import DETERMINISTIC_ENGINE
from tests.support.http_host import PNG, HttpHost, Reply, sequence
from tests.support.images import cells, png
from tests.support.label_studio import LEGACY_TOKEN as TOKEN

pytestmark = pytest.mark.e2e  # every test here starts real processes on loopback

FAIL_FAST_S = 3.0
FETCH_RETRIES = 2  # IMAGE_FETCH_RETRIES: 3 attempts in all
FIRST_BACKOFF_S = 0.25  # backends.images.retries.FIRST_BACKOFF_S


def kill_9(backend) -> None:
    os.killpg(backend.process.pid, signal.SIGKILL)
    backend.process.popen.wait(timeout=10)


def versions(client, backend) -> list[dict]:
    response = client.get(f"{backend.url}/versions", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["versions"]


# --------------------------------------------------------------------------- kill -9 during training


def test_kill_9_during_training_keeps_the_last_good_model_and_training_resumes(tmp_path):
    images = {task_id: cells(task_id) for task_id in range(1, 11)}
    label_studio = StandInLabelStudio(images, annotated=set(range(1, 7)))
    models = tmp_path / "models"
    good = seed_model(models)
    env = {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "MODEL_DIR": str(models),
        "TRAIN_MINUTES": "0.15",
        "DEVICE": "cpu",
    }
    first = launch("segmentation", env, tmp_path / "first")
    try:
        with session() as client:
            assert seg_predict(client, first, label_studio.task(7)).json()["results"][0]["model_version"] == good
            start_training(client, first)
            wait_for(lambda: project_state(client, first).get("step", 0) >= 2, 60, "two training steps")
            assert project_state(client, first)["state"] == "training"
            kill_9(first)
    finally:
        first.stop()

    from segmentation.versions import current_version, list_versions

    assert current_version(models / "project-1") == good
    assert [info.version for info in list_versions(models / "project-1")] == [good]

    second = launch("segmentation", env, tmp_path / "second")
    try:
        with session() as client:
            listed = versions(client, second)
            assert [(v["version"], v["current"]) for v in listed] == [(good, True)], listed
            answer = seg_predict(client, second, label_studio.task(8))
            assert answer.status_code == 200, answer.text
            prediction = answer.json()["results"][0]
            assert prediction["model_version"] == good and 0 <= prediction["score"] <= 1
            assert not any(p.name.startswith(".incomplete-") for p in (models / "project-1").iterdir())

            start_training(client, second)
            final = wait_for(
                lambda: (s := project_state(client, second)).get("finished") and s, 90, "the new training run to finish"
            )
            assert final["state"] == "idle", final
            trained = final["model_version"]
            assert trained != good
            assert seg_predict(client, second, label_studio.task(9)).json()["results"][0]["model_version"] == trained
            assert {(v["version"], v["current"]) for v in versions(client, second)} == {(good, False), (trained, True)}
    finally:
        second.stop()
        label_studio.stop()


# --------------------------------------------------------------------------- Label Studio down, image host 500


def failing_image_host(image: np.ndarray, flaky_failures: int = 2) -> HttpHost:
    """Loopback image host (arrival times per path: `times(path)`). /always-500.png: HTTP 500;
    /flaky.png: 500 for its first `flaky_failures` GETs, then the PNG; anything else: 404."""
    error = Reply(500, b"<html>Internal Server Error</html>", {"Content-Type": "text/html"})
    busy = Reply(500, b"<html>busy</html>", {"Content-Type": "text/html"})
    return HttpHost(
        {"/always-500.png": error, "/flaky.png": sequence(*[busy] * flaky_failures, Reply(200, png(image), PNG))}
    )


@pytest.fixture(scope="module")
def degraded_stack(tmp_path_factory):
    """A stand-in Label Studio (tasks 1..12 uploaded as cells-<id>.png), an image host that fails,
    and both backends pointed at them: sam (deterministic engine), segmentation (a seeded model)."""
    home = tmp_path_factory.mktemp("faults")
    images = {task_id: cells(task_id) for task_id in range(1, 13)}
    label_studio = StandInLabelStudio(images, annotated=set())
    image_host = failing_image_host(images[1][0]).start()
    common = {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "IMAGE_FETCH_RETRIES": str(FETCH_RETRIES),
        "IMAGE_FETCH_TIMEOUT": "5",
    }
    started = []
    try:
        started.append(
            launch(
                "sam",
                {
                    **common,
                    "SAM_ENGINE": DETERMINISTIC_ENGINE,
                    "EMBEDDING_CACHE_MB": "8",
                    "IMAGE_ALLOWED_HOSTS": image_host.netloc,
                },
                home / "sam",
            )
        )
        seeded = seed_model(home / "models")
        started.append(
            launch(
                "segmentation", {**common, "MODEL_DIR": str(home / "models"), "DEVICE": "cpu"}, home / "segmentation"
            )
        )
        sam, segmentation = started
        yield label_studio, image_host, sam, segmentation, seeded
    finally:
        for backend in reversed(started):
            backend.stop()
        image_host.stop()
        label_studio.stop()


def health(client, backend) -> dict:
    response = client.get(f"{backend.url}/health", timeout=2)  # Label Studio waits 1 s; allow load
    assert response.status_code == 200
    return response.json()


def sam_click(client, backend, label_studio, task_id: int) -> tuple[object, float, Click]:
    """A smart rectangle on task `task_id`'s uploaded image; returns (response, seconds, click)."""
    image_pixels = label_studio.images[task_id][0]
    image = TaskImage(task_id, label_studio.upload_path(task_id), b"", image_pixels, ())
    prompt = Prompt((10, 12, 60, 70), ((30, 40), (11, 13)), (1, 0))
    task = label_studio.task(task_id)
    began = time.monotonic()
    response = client.post(f"{backend.url}/predict", json=predict_body(task, click_context(prompt, image)), timeout=60)
    elapsed = time.monotonic() - began
    click = Click(
        0,
        image,
        prompt,
        began,
        1000 * elapsed,
        response.status_code,
        response.json() if response.status_code == 200 else None,
    )
    return response, elapsed, click


def test_label_studio_down_degrades_health_fails_fast_and_recovers(degraded_stack):
    label_studio, _, sam, segmentation, seeded = degraded_stack
    with session() as client:
        for backend in (sam, segmentation):
            wait_for(
                lambda backend=backend: health(client, backend).get("label_studio") == "reachable",
                20,
                f"{backend.name} to see Label Studio",
            )
            assert health(client, backend)["status"] == "UP"
        label_studio.stop()
        try:
            for backend in (sam, segmentation):
                report = wait_for(
                    lambda backend=backend: (h := health(client, backend))["status"] == "DEGRADED" and h,
                    20,
                    f"{backend.name} /health to say DEGRADED",
                )
                assert report["label_studio"] == "unreachable", report

            response, elapsed, _ = sam_click(client, sam, label_studio, 3)
            assert response.status_code == 503, response.text
            assert "Label Studio" in response.json()["error"] and "cells-3.png" in response.json()["error"]
            assert elapsed < FAIL_FAST_S, f"the SAM click took {elapsed:.1f} s to fail"

            began = time.monotonic()
            response = seg_predict(client, segmentation, label_studio.task(4))
            elapsed = time.monotonic() - began
            assert response.status_code == 503, response.text
            assert "Label Studio" in response.json()["error"]
            assert elapsed < FAIL_FAST_S, f"the segmentation prediction took {elapsed:.1f} s to fail"
        finally:
            label_studio.start()  # same port: Label Studio comes back where the backends expect it

        for backend in (sam, segmentation):
            wait_for(
                lambda backend=backend: health(client, backend)["status"] == "UP", 20, f"{backend.name} to recover"
            )
            assert health(client, backend)["label_studio"] == "reachable"
        response, _, click = sam_click(client, sam, label_studio, 3)
        assert response.status_code == 200, response.text
        assert check_own_mask(click) is None
        response = seg_predict(client, segmentation, label_studio.task(4))
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["model_version"] == seeded


def image_click(client, backend, image_host, path: str, task_id: int):
    pixels = np.zeros((96, 96, 3), np.uint8)  # only the size matters for the prompt's percentages
    image = TaskImage(task_id, path, b"", pixels, ())
    task = {"id": task_id, "data": {"image": f"http://{image_host.netloc}{path}"}}
    prompt = Prompt((10, 10, 50, 50))
    began = time.monotonic()
    response = client.post(f"{backend.url}/predict", json=predict_body(task, click_context(prompt, image)), timeout=60)
    return response, time.monotonic() - began


def test_image_host_answering_500_is_retried_with_backoff_then_a_clear_error(degraded_stack):
    _, image_host, sam, _, _ = degraded_stack
    with session() as client:
        response, elapsed = image_click(client, sam, image_host, "/always-500.png", 501)
        assert response.status_code == 422, response.text
        message = response.json()["error"]
        assert "HTTP 500" in message and "always-500.png" in message, message
        attempts = image_host.times("/always-500.png")
        assert len(attempts) == 1 + FETCH_RETRIES, attempts
        gaps = np.diff(attempts)
        assert gaps[0] >= 0.8 * FIRST_BACKOFF_S and gaps[1] >= 0.8 * 2 * FIRST_BACKOFF_S, gaps  # doubling backoff
        assert elapsed < 5.0, f"the failing click took {elapsed:.1f} s"

        response, _ = image_click(client, sam, image_host, "/flaky.png", 502)  # recovers on the third attempt
        assert response.status_code == 200, response.text
        assert len(image_host.times("/flaky.png")) == 1 + FETCH_RETRIES
        assert response.json()["results"][0]["result"][0]["original_width"] == 96

        response, _ = image_click(client, sam, image_host, "/gone.png", 503)
        assert response.status_code == 422 and "not found" in response.json()["error"], response.text
        assert len(image_host.times("/gone.png")) == 1  # a 404 is final: no retry

        # Nothing was cached from the failures: the next click on the broken image asks again.
        image_click(client, sam, image_host, "/always-500.png", 501)
        assert len(image_host.times("/always-500.png")) == 2 * (1 + FETCH_RETRIES)
        assert health(client, sam)["embedding_cache"]["entries"] >= 1


# --------------------------------------------------------------------------- GCS emulator down during import_gcs


@pytest.fixture(scope="module")
def gcs_stack(tmp_path_factory):
    """fake-gcs-server (restartable on the same port, objects kept on disk) and a real Label Studio."""
    from devstack.gcs import start_fake_gcs
    from devstack.label_studio import LS_BIN, label_studio_installed, start_label_studio

    if not label_studio_installed():
        unavailable(f"Label Studio is not installed at {LS_BIN} (run `make install-label-studio`)")
    home = tmp_path_factory.mktemp("gcs-faults")
    port = free_port()
    state = {"emulator": start_fake_gcs(home / "gcs", home / "logs" / "fake-gcs-1.log", port=port)}

    def kill_emulator() -> None:
        process = state["emulator"].process
        os.killpg(process.pid, signal.SIGKILL)
        process.popen.wait(timeout=10)

    def restart_emulator() -> None:
        state["emulator"] = start_fake_gcs(home / "gcs", home / "logs" / "fake-gcs-2.log", port=port)

    label_studio = None
    try:
        label_studio = start_label_studio(home / "label-studio", home / "logs" / "label-studio.log")
        yield label_studio, state, kill_emulator, restart_emulator
    finally:
        if label_studio is not None:
            label_studio.stop()
        state["emulator"].stop()


def fill_bucket(emulator, bucket: str, prefix: str, count: int) -> dict[str, dict]:
    """`count` small PNGs under gs://bucket/prefix/ with a JSON sidecar each; returns {gs uri: metadata}."""
    from devstack.gcs import upload_objects

    objects, expected = {}, {}
    for index in range(count):
        name = f"{prefix}/img-{index}.png"
        objects[name] = png(cells(200 + index, (32, 32))[0])
        metadata = {"sample": f"S{index}", "stain": "DAPI"}
        objects[f"{prefix}/img-{index}.json"] = json.dumps(metadata).encode()
        expected[f"gs://{bucket}/{name}"] = metadata
    upload_objects(emulator.client(), bucket, objects)
    return expected


def project_tasks(label_studio, project_id: int) -> list[dict]:
    return [task.data for task in label_studio.ls.tasks.list(project=project_id, resolve_uri=False)]


def new_project(label_studio) -> int:
    config = (
        '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
        '<Label value="Nucleus"/></BrushLabels></View>'
    )
    return int(label_studio.ls.projects.create(title=f"faults {uuid.uuid4().hex[:6]}", label_config=config).id)


def test_gcs_down_while_listing_fails_clearly_and_a_rerun_imports_each_image_once(gcs_stack, monkeypatch):
    from sdk_scripts import import_gcs

    label_studio, state, kill_emulator, restart_emulator = gcs_stack
    bucket = f"list-{uuid.uuid4().hex[:6]}"
    expected = fill_bucket(state["emulator"], bucket, "images", 3)
    project_id = new_project(label_studio)
    argv = ["--project", str(project_id), "--source", f"gs://{bucket}/images"]

    real_list_objects = import_gcs.list_objects

    def list_objects_after_a_crash(*args, **kwargs):
        kill_emulator()  # the bucket was found; the emulator dies before the listing
        return real_list_objects(*args, **kwargs)

    monkeypatch.setattr(import_gcs, "list_objects", list_objects_after_a_crash)
    began = time.monotonic()
    status, output = run_import(label_studio, state["emulator"].url, argv)
    assert status == 2, output
    assert "GCS could not be reached" in output and f"gs://{bucket}/images" in output, output
    assert "Traceback" not in output
    assert time.monotonic() - began < 45
    assert project_tasks(label_studio, project_id) == []

    monkeypatch.setattr(import_gcs, "list_objects", real_list_objects)
    restart_emulator()
    for _ in range(2):  # the rerun imports everything; one more run imports nothing
        status, output = run_import(label_studio, state["emulator"].url, argv)
        assert status == 0, output
    tasks = project_tasks(label_studio, project_id)
    assert sorted(task["image"] for task in tasks) == sorted(expected)
    for task in tasks:
        assert {k: task[k] for k in ("sample", "stain")} == expected[task["image"]]


@pytest.fixture(scope="module")
def gcs_down_mid_sidecars(gcs_stack):
    """import_gcs with the emulator killed after the first sidecar read, then (emulator back) a rerun.

    Returns (project tasks after both runs, expected {uri: metadata}, first run (status, output),
    rerun (status, output)).
    """
    from sdk_scripts import import_gcs

    label_studio, state, kill_emulator, restart_emulator = gcs_stack
    bucket = f"side-{uuid.uuid4().hex[:6]}"
    expected = fill_bucket(state["emulator"], bucket, "images", 2)
    project_id = new_project(label_studio)
    argv = ["--project", str(project_id), "--source", f"gs://{bucket}/images"]
    real_read_object = import_gcs.read_object
    reads = []

    def read_then_crash(*args, **kwargs):
        if len(reads) == 1:
            kill_emulator()
        reads.append(args)
        return real_read_object(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(import_gcs, "read_object", read_then_crash)
        first = run_import(label_studio, state["emulator"].url, argv)
    restart_emulator()
    rerun = run_import(label_studio, state["emulator"].url, argv)
    return project_tasks(label_studio, project_id), expected, first, rerun


def run_import(label_studio, emulator_url: str, argv: list[str]) -> tuple[int, str]:
    """import_gcs in this process (so a fault can be injected at a known moment): (exit status, output)."""
    import contextlib
    import io

    from sdk_scripts import import_gcs
    from sdk_scripts.common import CliSettings, run_main

    settings = CliSettings(
        label_studio_url=label_studio.url, label_studio_api_key=label_studio.token, storage_emulator_host=emulator_url
    )
    args = import_gcs.build_parser().parse_args(argv + ["--no-progress"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = run_main(lambda: import_gcs.run(args, settings))
    return status, out.getvalue()


def test_gcs_down_mid_import_then_rerun_leaves_no_duplicate_tasks(gcs_down_mid_sidecars):
    tasks, expected, first, rerun = gcs_down_mid_sidecars
    assert rerun[0] == 0, rerun[1]
    images = [task["image"] for task in tasks]
    assert len(images) == len(set(images)), f"duplicate tasks: {images}"
    assert sorted(images) == sorted(expected), (images, first[1], rerun[1])


def test_gcs_down_mid_import_loses_no_metadata(gcs_down_mid_sidecars):
    tasks, expected, first, rerun = gcs_down_mid_sidecars
    for task in tasks:
        assert {k: task.get(k) for k in ("sample", "stain")} == expected[task["image"]], (task, first[1])
