"""Concurrent annotators against real backend processes on loopback.

- Eight annotators click on eight different images at once for ~10 s against `python -m sam` with
  the deterministic engine (tests/reliability/deterministic_engine.py), whose exact answer each
  annotator can compute from its own image and prompt: any cross-talk (another image's embedding,
  another request's prompt) is a wrong mask or score. The embedding cache is capped small
  (EMBEDDING_CACHE_MB) so it evicts all along; /health and /metrics are read during the run and
  the cache's bytes never exceed the cap.
- The segmentation backend keeps answering /predict (each in < 5 s) while a training run is in
  progress in the same process. Label Studio is a loopback stand-in serving the project export,
  the project and the uploaded images (`StandInLabelStudio`, also used by test_faults.py).

Marked e2e (the project's marker for tests that start backend processes on loopback).
"""
from __future__ import annotations

import http.server
import json
import random
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import requests

from bench.load import LABEL_CONFIG as SAM_CONFIG
from bench.load import (
    CacheSampler,
    Click,
    ImageHost,
    Prompt,
    TaskImage,
    metric_value,
    png_bytes,
    run_annotators,
)
from devstack.backends import Backend, start_backend
from tests.reliability.deterministic_engine import (
    EMBEDDING_BYTES,
    expected_mask,
    expected_score,
    image_signature,
)

pytestmark = pytest.mark.e2e  # starts real backend processes on loopback (the project's e2e marker)

DETERMINISTIC = "tests.reliability.deterministic_engine:DeterministicEngine"
TOKEN = "0123456789abcdef0123456789abcdef01234567"
PROJECT = "1.1762076800"
ANNOTATORS = 8
IMAGES = 16  # two per annotator
CACHE_MB = 3.5  # room for three 1 MiB embeddings out of sixteen images: evictions all along
RUN_SECONDS = 10.0
PREDICT_BOUND_S = 5.0

SEG_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Nucleus"/></BrushLabels>
</View>"""


# --------------------------------------------------------------------------- shared helpers


def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # loopback only: never through a proxy from the environment
    return s


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll `condition()` until it returns something truthy; AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except (requests.RequestException, ValueError, KeyError) as error:
            last_error = error
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_error})")


def launch(name: str, env: dict[str, str], home: Path) -> Backend:
    """Start `python -m <name>` on a free loopback port, one torch thread, logs under `home`."""
    base = {"IMAGE_CACHE_DIR": str(home / "image-cache"), "LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1",
            "LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ""}
    return start_backend(name, {**base, **env}, home / f"{name}.log", timeout=90)


def cells(seed: int, size: tuple[int, int] = (96, 96)) -> tuple[np.ndarray, np.ndarray]:
    """(HxWx3 uint8 image, HxW bool truth): bright disks on a noisy dark background."""
    rng = np.random.default_rng(seed)
    height, width = size
    image = rng.integers(0, 50, (height, width, 3)).astype(np.uint8)
    truth = np.zeros((height, width), bool)
    rows, cols = np.ogrid[:height, :width]
    for _ in range(4):
        cy, cx, r = rng.integers(12, height - 12), rng.integers(12, width - 12), rng.integers(6, 11)
        truth |= (rows - cy) ** 2 + (cols - cx) ** 2 < r * r
    image[truth] = (220, 200, 210)
    return image, truth


def brush_annotation(annotation_id: int, mask: np.ndarray) -> dict:
    from backends.masks.rle import encode_rle

    height, width = mask.shape
    region = {"id": f"r{annotation_id}", "from_name": "tag", "to_name": "image", "type": "brushlabels",
              "original_width": width, "original_height": height, "image_rotation": 0,
              "value": {"format": "rle", "rle": encode_rle(mask), "brushlabels": ["Nucleus"]}}
    return {"id": annotation_id, "result": [region], "was_cancelled": False, "ground_truth": False,
            "created_at": "2026-11-02T10:00:00Z", "updated_at": "2026-11-02T10:00:00Z", "completed_by": 1}


class StandInLabelStudio:
    """What the backends read from Label Studio 1.23, on 127.0.0.1, stoppable and restartable on
    the same port (a Label Studio that goes down and comes back).

    Project 1 (`label_config`), tasks `images` {task id: (HxWx3 image, HxW truth)}; tasks in
    `annotated` have one brush annotation made from their truth. Serves /health,
    /api/projects/1, /api/projects/1/export and /data/upload/1/cells-<id>.png, all but /health
    with the legacy token checked. `requests` counts requests per path.
    """

    def __init__(self, images: dict[int, tuple[np.ndarray, np.ndarray]], annotated: set[int],
                 label_config: str = SEG_CONFIG, port: int = 0):
        self.images = images
        self.pngs = {task_id: png_bytes(image) for task_id, (image, _) in images.items()}
        self.annotated = annotated
        self.label_config = label_config
        self.requests: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = port
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def upload_path(task_id: int) -> str:
        return f"/data/upload/1/cells-{task_id}.png"

    def task(self, task_id: int) -> dict:
        return {"id": task_id, "data": {"image": self.upload_path(task_id)}, "annotations": [], "predictions": []}

    def export(self) -> list[dict]:
        return [{**self.task(task_id), "annotations": [brush_annotation(10 * task_id, self.images[task_id][1])]}
                for task_id in sorted(self.annotated)]

    def reply(self, path: str, authorised: bool) -> tuple[int, bytes, str]:
        if path == "/health":
            return 200, b'{"status": "UP"}', "application/json"
        if not authorised:
            return 401, b'{"detail": "Authentication credentials were not provided."}', "application/json"
        if path == "/api/projects/1":
            return 200, json.dumps({"id": 1, "label_config": self.label_config}).encode(), "application/json"
        if path == "/api/projects/1/export":
            return 200, json.dumps(self.export()).encode(), "application/json"
        for task_id, body in self.pngs.items():
            if path == self.upload_path(task_id):
                return 200, body, "image/png"
        return 404, b'{"detail": "Not found."}', "application/json"

    def start(self) -> None:
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                with stand_in._lock:
                    stand_in.requests[path] = stand_in.requests.get(path, 0) + 1
                authorised = self.headers.get("Authorization") == f"Token {TOKEN}"
                status, body, content_type = stand_in.reply(path, authorised)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None


def seed_model(model_dir: Path, labels: tuple[str, ...] = ("Nucleus",)) -> str:
    """Write a complete (randomly initialised) model version for project 1, as the trainer does;
    returns its version name."""
    import torch

    from segmentation.network import NetworkConfig, build_network
    from segmentation.versions import save_version

    torch.manual_seed(0)
    config = NetworkConfig(n_classes=len(labels) + 1)
    info = save_version(model_dir / "project-1", build_network(config).state_dict(), labels=labels, network=config,
                        metrics={"val_dice": {label: None for label in labels}}, training={"seeded_by": "test"})
    return info.version


def seg_predict(client: requests.Session, backend: Backend, task: dict, timeout_s: float = 30.0) -> requests.Response:
    body = {"tasks": [task], "project": PROJECT, "label_config": SEG_CONFIG,
            "params": {"login": None, "password": None, "context": None}}
    return client.post(f"{backend.url}/predict", json=body, timeout=timeout_s)


def project_state(client: requests.Session, backend: Backend) -> dict:
    return client.get(f"{backend.url}/health", timeout=5).json().get("projects", {}).get("1", {})


def start_training(client: requests.Session, backend: Backend) -> None:
    began = time.monotonic()
    response = client.post(f"{backend.url}/webhook", json={"action": "START_TRAINING",
                                                           "project": {"id": 1, "label_config": SEG_CONFIG}}, timeout=5)
    assert response.status_code == 200 and response.json()["status"] == "ok", response.text
    assert time.monotonic() - began < 1.0, "Label Studio waits 1 s for a webhook"


# --------------------------------------------------------------------------- SAM: annotators


def synthetic_images(count: int) -> list[TaskImage]:
    """`count` different noise images of different sizes (so a wrong image is a wrong shape too)."""
    images = []
    for index in range(count):
        rng = np.random.default_rng(100 + index)
        height, width = 48 + 4 * index, 64 + 3 * index
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        images.append(TaskImage(1000 + index, f"/img-{index}.png", png_bytes(pixels), pixels, ()))
    return images


def random_click(rng: random.Random, image: TaskImage) -> Prompt:
    """A box of at least 4x4 px; half the time a positive and a negative point inside it."""
    x0, y0 = rng.randrange(0, image.width - 8), rng.randrange(0, image.height - 8)
    x1, y1 = rng.randrange(x0 + 4, image.width + 1), rng.randrange(y0 + 4, image.height + 1)
    if rng.random() < 0.5:
        return Prompt((x0, y0, x1, y1))
    inside = [(rng.randrange(x0, x1), rng.randrange(y0, y1)) for _ in range(2)]
    return Prompt((x0, y0, x1, y1), tuple(inside), (1, 0))


def check_own_mask(click: Click) -> str | None:
    """None when the answer is exactly the deterministic engine's mask and score for this image and prompt."""
    from backends.masks.rle import decode_rle

    image, prompt = click.image, click.prompt
    results = click.answer.get("results") or []
    if len(results) != 1 or len(results[0].get("result") or []) != 1:
        return f"expected one prediction with one region, got {json.dumps(click.answer)[:200]}"
    prediction = results[0]
    region = prediction["result"][0]
    if region["type"] != "brushlabels" or region["value"]["brushlabels"] != ["Nucleus"]:
        return f"wrong region type or label: {region['type']} {region['value'].get('brushlabels')}"
    if (region["original_width"], region["original_height"]) != (image.width, image.height):
        return (f"region is for a {region['original_width']}x{region['original_height']} image, "
                f"this one is {image.width}x{image.height}")
    signature = image_signature(image.pixels)
    mask = decode_rle(region["value"]["rle"], image.height, image.width)
    expected = expected_mask(signature, image.height, image.width, prompt.box, prompt.points, prompt.point_labels)
    if not np.array_equal(mask, expected):
        return f"mask differs from this image's and prompt's in {int((mask != expected).sum())} pixels"
    if abs(prediction["score"] - expected_score(signature)) > 1e-9:
        return f"score {prediction['score']} is not this image's ({expected_score(signature)})"
    return None


@pytest.fixture(scope="module")
def synthetic_host():
    images = synthetic_images(IMAGES)
    assert len({image_signature(image.pixels) for image in images}) == IMAGES
    with ImageHost({image.path: image.png for image in images}) as host:
        host.images = images
        yield host


@pytest.fixture(scope="module")
def sam_backend(synthetic_host, tmp_path_factory):
    home = tmp_path_factory.mktemp("sam-concurrency")
    backend = launch("sam", {"SAM_ENGINE": DETERMINISTIC, "EMBEDDING_CACHE_MB": str(CACHE_MB),
                             "IMAGE_ALLOWED_HOSTS": synthetic_host.netloc}, home)
    yield backend
    backend.stop()


def test_the_deterministic_engine_tells_images_and_prompts_apart(synthetic_host):
    """The check above can fail: another image or another prompt gives another mask."""
    first, second = synthetic_host.images[:2]
    rng = random.Random(3)
    prompt = random_click(rng, first)
    mine = expected_mask(image_signature(first.pixels), first.height, first.width, prompt.box)
    other_prompt = Prompt((prompt.box[0], prompt.box[1], prompt.box[2] - 1, prompt.box[3]))
    assert not np.array_equal(mine, expected_mask(image_signature(first.pixels), first.height, first.width,
                                                  other_prompt.box))
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
            run = run_annotators(sam_backend.url, synthetic_host.url, synthetic_host.images, ANNOTATORS,
                                 RUN_SECONDS, make_prompt=random_click, check=check_own_mask, clicks_per_task=4,
                                 seed=7)
        metrics = client.get(f"{sam_backend.url}/metrics", timeout=10).text
        health = client.get(f"{sam_backend.url}/health", timeout=10).json()

    per_annotator = [sum(1 for c in run.clicks if c.annotator == i) for i in range(ANNOTATORS)]
    print(f"{len(run.clicks)} clicks in {run.seconds:.1f} s, per annotator {per_annotator}, "
          f"peak cache {sampler.peak_bytes} of {sampler.capacity_bytes} bytes")
    assert not run.problems, f"{len(run.problems)} wrong answers, e.g. {run.problems[:3]}"
    assert min(per_annotator) >= 5, f"some annotator barely clicked: {per_annotator}"
    assert run.seconds < RUN_SECONDS + 30
    # Annotators really overlapped: most clicks were in flight together with another one.
    spans = sorted((c.started, c.started + c.latency_ms / 1000) for c in run.clicks)
    overlapping = sum(1 for (s0, e0), (s1, _) in zip(spans, spans[1:]) if s1 < e0)
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
        before = metric_value(client.get(f"{sam_backend.url}/metrics", timeout=10).text, "cache_misses_total",
                              'cache="embeddings"')
    run = run_annotators(sam_backend.url, synthetic_host.url, [fresh] * ANNOTATORS, ANNOTATORS, 30.0,
                         make_prompt=random_click, check=check_own_mask, max_clicks=1, seed=11)
    assert not run.problems and len(run.ok_clicks) == ANNOTATORS, run.problems
    with session() as client:
        after = metric_value(client.get(f"{sam_backend.url}/metrics", timeout=10).text, "cache_misses_total",
                             'cache="embeddings"')
    assert after - before == 1, f"{after - before} embeddings computed for one image"


# --------------------------------------------------------------------------- segmentation: predict while training


@pytest.fixture
def training_stack(tmp_path):
    """A stand-in Label Studio with 6 annotated 96x96 tasks (1..6) and 4 unlabelled 256x256 ones (7..10), and a
    segmentation backend that already serves a (seeded) model and trains for TRAIN_MINUTES=0.2."""
    images = {task_id: cells(task_id, (96, 96) if task_id <= 6 else (256, 256)) for task_id in range(1, 11)}
    label_studio = StandInLabelStudio(images, annotated=set(range(1, 7)))
    seeded = seed_model(tmp_path / "models")
    backend = launch("segmentation", {
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN, "MODEL_DIR": str(tmp_path / "models"),
        "TRAIN_MINUTES": "0.2", "VAL_FRACTION": "0.2", "DEVICE": "cpu",
    }, tmp_path)
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

    print(f"{len(latencies)} predictions during training ({during} answered while it still ran), "
          f"slowest {max(e for e, _, _ in latencies):.2f} s")
    assert during >= 3, f"only {during} predictions completed while the run was training"
    assert all(status == 200 for _, status, _ in latencies), latencies
    slowest = max(elapsed for elapsed, _, _ in latencies)
    assert slowest < PREDICT_BOUND_S, f"a prediction took {slowest:.1f} s during training"
    assert {version for *_, version in latencies} <= {seeded, final.get("model_version")}
    assert final["state"] == "idle", final
    assert after.status_code == 200
    assert after.json()["results"][0]["model_version"] == final["model_version"] != seeded
