"""Concurrent annotators against real backend processes on loopback.

- Eight annotators click on eight different images at once for ~10 s against `python -m sam` with
  the deterministic engine (tests/support/engines.py), whose exact answer each
  annotator can compute from its own image and prompt: any cross-talk (another image's embedding,
  another request's prompt) is a wrong mask or score. The embedding cache is capped small
  (EMBEDDING_CACHE_MB) so it evicts all along; /health and /metrics are read during the run and
  the cache's bytes never exceed the cap.
- The segmentation backend keeps answering /predict (each in < 5 s) while a training run is in
  progress in the same process. Label Studio is a loopback stand-in serving the project export,
  the project and the uploaded images (`StandInLabelStudio` in stack.py, also used by test_faults.py).

Marked e2e (the project's marker for tests that start backend processes on loopback).
"""

from __future__ import annotations

import itertools
import random
import time
from types import SimpleNamespace

import numpy as np
import pytest

from bench.load import LABEL_CONFIG as SAM_CONFIG
from bench.load import CacheSampler, Prompt, TaskImage, metric_value, run_annotators
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
from tests.support.engines import DETERMINISTIC_ENGINE, EMBEDDING_BYTES, expected_mask, image_signature
from tests.support.http_host import HttpHost
from tests.support.images import cells, png
from tests.support.label_studio import LEGACY_TOKEN as TOKEN
from tests.support.payloads import PROJECT

pytestmark = pytest.mark.e2e  # starts real backend processes on loopback (the project's e2e marker)

ANNOTATORS = 8
IMAGES = 16  # two per annotator
CACHE_MB = 3.5  # room for three 1 MiB embeddings out of sixteen images: evictions all along
RUN_SECONDS = 10.0
PREDICT_BOUND_S = 5.0


# --------------------------------------------------------------------------- SAM: annotators


def synthetic_images(count: int) -> list[TaskImage]:
    """`count` different noise images of different sizes (so a wrong image is a wrong shape too)."""
    images = []
    for index in range(count):
        rng = np.random.default_rng(100 + index)
        height, width = 48 + 4 * index, 64 + 3 * index
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        images.append(TaskImage(1000 + index, f"/img-{index}.png", png(pixels), pixels, ()))
    return images


def random_click(rng: random.Random, image: TaskImage) -> Prompt:
    """A box of at least 4x4 px; half the time a positive and a negative point inside it."""
    x0, y0 = rng.randrange(0, image.width - 8), rng.randrange(0, image.height - 8)
    x1, y1 = rng.randrange(x0 + 4, image.width + 1), rng.randrange(y0 + 4, image.height + 1)
    if rng.random() < 0.5:
        return Prompt((x0, y0, x1, y1))
    inside = [(rng.randrange(x0, x1), rng.randrange(y0, y1)) for _ in range(2)]
    return Prompt((x0, y0, x1, y1), tuple(inside), (1, 0))


@pytest.fixture(scope="module")
def synthetic_host():
    images = synthetic_images(IMAGES)
    assert len({image_signature(image.pixels) for image in images}) == IMAGES
    with HttpHost({image.path: image.png for image in images}) as host:
        yield SimpleNamespace(url=host.url, netloc=host.netloc, images=images)


@pytest.fixture(scope="module")
def sam_backend(synthetic_host, tmp_path_factory):
    home = tmp_path_factory.mktemp("sam-concurrency")
    backend = launch(
        "sam",
        {
            "SAM_ENGINE": DETERMINISTIC_ENGINE,
            "EMBEDDING_CACHE_MB": str(CACHE_MB),
            "IMAGE_ALLOWED_HOSTS": synthetic_host.netloc,
        },
        home,
    )
    yield backend
    backend.stop()


def test_the_deterministic_engine_tells_images_and_prompts_apart(synthetic_host):
    """The check above can fail: another image or another prompt gives another mask."""
    first, second = synthetic_host.images[:2]
    rng = random.Random(3)
    prompt = random_click(rng, first)
    mine = expected_mask(image_signature(first.pixels), first.height, first.width, prompt.box)
    other_prompt = Prompt((prompt.box[0], prompt.box[1], prompt.box[2] - 1, prompt.box[3]))
    assert not np.array_equal(
        mine, expected_mask(image_signature(first.pixels), first.height, first.width, other_prompt.box)
    )
    signatures = {image_signature(image.pixels) for image in synthetic_host.images}
    patterns = {(s % 5, (s >> 8) % (3 + s % 5)) for s in signatures}
    assert len(patterns) > 4  # stripe period/phase differ across images, not only their sizes
    crop = second.pixels[: first.height, : first.width]
    if crop.shape == first.pixels.shape:
        assert image_signature(crop) != image_signature(first.pixels)


def test_eight_annotators_each_get_the_mask_of_their_own_image_and_prompt(sam_backend, synthetic_host):
    with session() as client:
        setup = client.post(f"{sam_backend.url}/setup", json={"project": PROJECT, "schema": SAM_CONFIG}, timeout=10)
        assert setup.status_code == 200 and setup.json()["model_version"] == "deterministic", setup.text
        with CacheSampler(sam_backend.url, interval_s=0.05) as sampler:
            run = run_annotators(
                sam_backend.url,
                synthetic_host.url,
                synthetic_host.images,
                ANNOTATORS,
                RUN_SECONDS,
                make_prompt=random_click,
                check=check_own_mask,
                clicks_per_task=4,
                seed=7,
            )
        metrics = client.get(f"{sam_backend.url}/metrics", timeout=10).text
        health = client.get(f"{sam_backend.url}/health", timeout=10).json()

    per_annotator = [sum(1 for c in run.clicks if c.annotator == i) for i in range(ANNOTATORS)]
    print(
        f"{len(run.clicks)} clicks in {run.seconds:.1f} s, per annotator {per_annotator}, "
        f"peak cache {sampler.peak_bytes} of {sampler.capacity_bytes} bytes"
    )
    assert not run.problems, f"{len(run.problems)} wrong answers, e.g. {run.problems[:3]}"
    assert min(per_annotator) >= 5, f"some annotator barely clicked: {per_annotator}"
    assert run.seconds < RUN_SECONDS + 30
    # Annotators really overlapped: most clicks were in flight together with another one.
    spans = sorted((c.started, c.started + c.latency_ms / 1000) for c in run.clicks)
    overlapping = sum(1 for (s0, e0), (s1, _) in itertools.pairwise(spans) if s1 < e0)
    assert overlapping > len(spans) // 4, f"only {overlapping} of {len(spans)} clicks overlapped"

    # The cache stayed within its byte cap the whole time, and had to evict to do so.
    capacity = int(CACHE_MB * 2**20)
    assert len(sampler.samples) >= 20 and sampler.failures == 0
    assert sampler.capacity_bytes == capacity
    assert 0 < sampler.peak_bytes <= capacity, sampler.peak_bytes
    assert max(s[1] for s in sampler.samples) <= capacity // EMBEDDING_BYTES
    assert metric_value(metrics, "cache_capacity_bytes", 'cache="embeddings"') == capacity
    assert metric_value(metrics, "cache_bytes", 'cache="embeddings"') <= capacity
    evictions = metric_value(metrics, "cache_evictions_total", 'cache="embeddings"')
    misses = metric_value(metrics, "cache_misses_total", 'cache="embeddings"')
    assert evictions and evictions > 0 and misses > IMAGES, (evictions, misses)
    assert health["embedding_cache"]["bytes"] <= capacity and health["engine"] == "deterministic"


def test_one_image_opened_by_every_annotator_is_embedded_once(sam_backend, synthetic_host):
    """Single flight: eight simultaneous first clicks on one new image compute one embedding."""
    image = synthetic_host.images[-1]
    fresh = TaskImage(99_999, image.path, image.png, image.pixels, ())  # a task id nobody used: not cached
    with session() as client:
        before = metric_value(
            client.get(f"{sam_backend.url}/metrics", timeout=10).text, "cache_misses_total", 'cache="embeddings"'
        )
    run = run_annotators(
        sam_backend.url,
        synthetic_host.url,
        [fresh] * ANNOTATORS,
        ANNOTATORS,
        30.0,
        make_prompt=random_click,
        check=check_own_mask,
        max_clicks=1,
        seed=11,
    )
    assert not run.problems and len(run.ok_clicks) == ANNOTATORS, run.problems
    with session() as client:
        after = metric_value(
            client.get(f"{sam_backend.url}/metrics", timeout=10).text, "cache_misses_total", 'cache="embeddings"'
        )
    assert after - before == 1, f"{after - before} embeddings computed for one image"


# --------------------------------------------------------------------------- segmentation: predict while training


@pytest.fixture
def training_stack(tmp_path):
    """A stand-in Label Studio with 6 annotated 96x96 tasks (1..6) and 4 unlabelled 256x256 ones (7..10), and a
    segmentation backend that already serves a (seeded) model and trains for TRAIN_MINUTES=0.2."""
    images = {task_id: cells(task_id, (96, 96) if task_id <= 6 else (256, 256)) for task_id in range(1, 11)}
    label_studio = StandInLabelStudio(images, annotated=set(range(1, 7)))
    seeded = seed_model(tmp_path / "models")
    backend = launch(
        "segmentation",
        {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": TOKEN,
            "MODEL_DIR": str(tmp_path / "models"),
            "TRAIN_MINUTES": "0.2",
            "VAL_FRACTION": "0.2",
            "DEVICE": "cpu",
        },
        tmp_path,
    )
    try:
        yield label_studio, backend, seeded
    finally:
        backend.stop()
        label_studio.stop()


def test_segmentation_keeps_answering_predict_while_training(training_stack):
    label_studio, backend, seeded = training_stack
    latencies: list[tuple[float, int, str]] = []  # (seconds, status, model_version)
    with session() as client:
        first = seg_predict(client, backend, label_studio.task(7))
        assert first.status_code == 200 and first.json()["results"][0]["model_version"] == seeded, first.text
        start_training(client, backend)
        wait_for(lambda: project_state(client, backend).get("step", 0) >= 1, 60, "the first training step")
        during = 0
        while project_state(client, backend).get("state") == "training" and len(latencies) < 400:
            task_id = 7 + len(latencies) % 4
            began = time.monotonic()
            response = seg_predict(client, backend, label_studio.task(task_id))
            elapsed = time.monotonic() - began
            version = response.json()["results"][0]["model_version"] if response.status_code == 200 else ""
            latencies.append((elapsed, response.status_code, version))
            if project_state(client, backend).get("state") == "training":
                during += 1
            time.sleep(0.05)  # an annotator's pace, not a tight loop competing with the trainer
        final = wait_for(lambda: (s := project_state(client, backend)).get("finished") and s, 90, "training to finish")
        after = seg_predict(client, backend, label_studio.task(8))

    print(
        f"{len(latencies)} predictions during training ({during} answered while it still ran), "
        f"slowest {max(e for e, _, _ in latencies):.2f} s"
    )
    assert during >= 3, f"only {during} predictions completed while the run was training"
    assert all(status == 200 for _, status, _ in latencies), latencies
    slowest = max(elapsed for elapsed, _, _ in latencies)
    assert slowest < PREDICT_BOUND_S, f"a prediction took {slowest:.1f} s during training"
    assert {version for *_, version in latencies} <= {seeded, final.get("model_version")}
    assert final["state"] == "idle", final
    assert after.status_code == 200
    assert after.json()["results"][0]["model_version"] == final["model_version"] != seeded
