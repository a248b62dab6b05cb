"""Concurrent annotators against a real SAM backend process on loopback.

    python -m bench.load [--annotators 8] [--seconds 20] [--engine classic|deterministic]

N simulated annotators each open their own DSB2018 images (from ../shared/data, served by a
loopback file server allowed through IMAGE_ALLOWED_HOSTS) and click on them: a smart rectangle
around a true nucleus (its bounding box), the way Label Studio sends it. Opening a task sends the
prewarm `/predict` without context first, as Label Studio does. Printed (one JSON line each, via
bench.common.emit): click latency p50 and p99 against the single-annotator p50 measured in the same
run, throughput (clicks/s, against one annotator's), the backend process's peak RSS (VmHWM from
/proc) and the peak embedding cache bytes against its cap (EMBEDDING_CACHE_MB).

The load generator (annotators and their clicks, samplers) is reused by tests/reliability; this
module imports nothing from tests/ (the `deterministic` engine is named for the backend process,
which finds it in the checkout's tests/support). Everything is bounded: `--seconds` per phase,
`--max-clicks` per annotator, loopback only.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DETERMINISTIC_ENGINE = "tests.support.engines:DeterministicEngine"

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Nucleus"/><Label value="Cell"/></BrushLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="Nucleus"/><Label value="Cell"/>
  </RectangleLabels>
  <KeyPointLabels name="point" toName="image" smart="true">
    <Label value="Nucleus"/><Label value="Cell"/>
  </KeyPointLabels>
</View>"""
PROJECT = "1.1762076800"


# --------------------------------------------------------------------------- images and prompts


@dataclass(frozen=True)
class TaskImage:
    """One task's image: served at `path` (its bytes `png`), `pixels` HxWx3 uint8, candidate `boxes`
    XYXY pixels."""

    task_id: int
    path: str
    png: bytes
    pixels: np.ndarray
    boxes: tuple[tuple[int, int, int, int], ...]

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


@dataclass(frozen=True)
class Prompt:
    """One click: box XYXY integer pixels, optional points [(x, y)] integer pixels inside the box."""

    box: tuple[int, int, int, int]
    points: tuple[tuple[int, int], ...] = ()
    point_labels: tuple[int, ...] = ()


def dsb2018_images(data_dir: Path, count: int, first_task_id: int = 1) -> list[TaskImage]:
    """The first `count` DSB2018 images (sorted ids) with their nuclei's bounding boxes as prompts;
    served by an ImageHost on data_dir / "dsb2018" / "images"."""
    paths = sorted((data_dir / "dsb2018" / "images").glob("*.png"))[:count]
    images = []
    for offset, path in enumerate(paths):
        pixels = np.array(Image.open(path).convert("RGB"))
        labels = np.array(Image.open(data_dir / "dsb2018" / "labels" / path.name))
        boxes = []
        for instance in np.unique(labels)[1:]:
            rows, cols = np.nonzero(labels == instance)
            if rows.max() > rows.min() and cols.max() > cols.min():
                boxes.append((int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1))
        images.append(
            TaskImage(
                first_task_id + offset,
                f"/{path.name}",
                path.read_bytes(),
                pixels,
                tuple(boxes) or ((0, 0, pixels.shape[1], pixels.shape[0]),),
            )
        )
    return images


def box_prompt(rng: random.Random, image: TaskImage) -> Prompt:
    """A smart rectangle on one of the image's candidate boxes."""
    return Prompt(rng.choice(image.boxes))


# --------------------------------------------------------------------------- Label Studio payloads


def rectangle_region(box: Sequence[int], width: int, height: int, label: str = "Nucleus") -> dict:
    """A smart rectangle region as Label Studio sends it (percent of the original size)."""
    x0, y0, x1, y1 = box
    return {
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "x": 100.0 * x0 / width,
            "y": 100.0 * y0 / height,
            "width": 100.0 * (x1 - x0) / width,
            "height": 100.0 * (y1 - y0) / height,
            "rotation": 0,
            "rectanglelabels": [label],
        },
        "id": "rect",
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }


def keypoint_region(xy: Sequence[int], width: int, height: int, positive: bool, label: str = "Nucleus") -> dict:
    x, y = xy
    return {
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"x": 100.0 * x / width, "y": 100.0 * y / height, "width": 0.6, "keypointlabels": [label]},
        "is_positive": positive,
        "id": "kp",
        "from_name": "point",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }


def predict_body(task: dict, context: dict | None) -> dict:
    return {
        "tasks": [task],
        "project": PROJECT,
        "label_config": LABEL_CONFIG,
        "params": {"login": None, "password": None, "context": context},
    }


def click_context(prompt: Prompt, image: TaskImage) -> dict:
    regions = [rectangle_region(prompt.box, image.width, image.height)]
    regions += [
        keypoint_region(xy, image.width, image.height, bool(label))
        for xy, label in zip(prompt.points, prompt.point_labels, strict=True)
    ]
    return {"result": regions}


# --------------------------------------------------------------------------- loopback image host


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class ImageHost:
    """Serves the files under `directory` on 127.0.0.1:<free port>, in threads."""

    def __init__(self, directory: Path):
        handler = functools.partial(_QuietFiles, directory=str(directory))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.netloc}"

    def __enter__(self) -> ImageHost:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------- annotators


@dataclass
class Click:
    annotator: int
    image: TaskImage
    prompt: Prompt
    started: float  # time.monotonic()
    latency_ms: float
    status: int
    answer: dict | None
    error: str = ""


Check = Callable[[Click], "str | None"]  # a problem description, or None when the answer is right


@dataclass
class LoadRun:
    clicks: list[Click] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok_clicks(self) -> list[Click]:
        return [click for click in self.clicks if click.status == 200]

    def latencies_ms(self) -> list[float]:
        return [click.latency_ms for click in self.ok_clicks]

    def throughput(self) -> float:
        return len(self.ok_clicks) / self.seconds if self.seconds else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(np.ceil(q / 100.0 * len(ordered)))))
    return float(ordered[rank - 1])


def run_annotators(
    backend_url: str,
    image_url: str,
    images: Sequence[TaskImage],
    annotators: int,
    seconds: float,
    make_prompt: Callable[[random.Random, TaskImage], Prompt] = box_prompt,
    check: Check | None = None,
    clicks_per_task: int = 5,
    max_clicks: int = 10_000,
    seed: int = 0,
    timeout_s: float = 30.0,
) -> LoadRun:
    """`annotators` threads, each on its own images (images[i::annotators]), for `seconds`.

    An annotator opens a task (prewarm: /predict without context), clicks `clicks_per_task` times
    on it (each click waits for its answer), then opens its next image; `check(click)` judges each
    answer. Returns every click; problems (failed checks, non-200 answers) in `problems`.
    """
    if annotators < 1 or len(images) < annotators:
        raise ValueError(f"need at least one image per annotator ({len(images)} images, {annotators} annotators)")
    run = LoadRun()
    lock = threading.Lock()
    start = threading.Barrier(annotators + 1)
    deadline_box: list[float] = []

    def annotator(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        own = list(images[index::annotators])
        with requests.Session() as session:
            session.trust_env = False
            start.wait()
            deadline = deadline_box[0]
            for turn in range(max_clicks):
                image = own[turn // clicks_per_task % len(own)]
                task = {"id": image.task_id, "data": {"image": image_url + image.path}}
                if turn % clicks_per_task == 0:  # opening the task: Label Studio's prewarm call
                    session.post(f"{backend_url}/predict", json=predict_body(task, None), timeout=timeout_s)
                if time.monotonic() >= deadline:
                    return
                prompt = make_prompt(rng, image)
                began = time.monotonic()
                try:
                    response = session.post(
                        f"{backend_url}/predict",
                        json=predict_body(task, click_context(prompt, image)),
                        timeout=timeout_s,
                    )
                    status, answer, error = response.status_code, response.json(), ""
                except (requests.RequestException, ValueError) as exc:
                    status, answer, error = 0, None, f"{type(exc).__name__}: {exc}"
                click = Click(index, image, prompt, began, 1000.0 * (time.monotonic() - began), status, answer, error)
                problem = None
                if status != 200:
                    problem = f"HTTP {status}: {error or (answer or {}).get('error')}"
                elif check is not None:
                    problem = check(click)
                with lock:
                    run.clicks.append(click)
                    if problem:
                        run.problems.append(f"annotator {index}, task {image.task_id}, {prompt}: {problem}")

    threads = [
        threading.Thread(target=annotator, args=(i,), name=f"annotator-{i}", daemon=True) for i in range(annotators)
    ]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    deadline_box.append(began + seconds)
    start.wait()
    for thread in threads:
        thread.join(timeout=seconds + 2 * timeout_s + 10)
    run.seconds = time.monotonic() - began
    if any(thread.is_alive() for thread in threads):
        run.problems.append("an annotator did not finish in time")
    return run


# --------------------------------------------------------------------------- samplers


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size of process `pid` so far (VmHWM), in MiB; 0 when unreadable."""
    return _status_kb(pid, "VmHWM") / 1024.0


def rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmRSS") / 1024.0


def _status_kb(pid: int, key: str) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


class CacheSampler:
    """Polls the backend's /health every `interval_s` in a thread: embedding cache bytes and cap."""

    def __init__(self, backend_url: str, interval_s: float = 0.1):
        self.backend_url = backend_url
        self.interval_s = interval_s
        self.samples: list[tuple[int, int, int]] = []  # (bytes, entries, capacity_bytes)
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cache-sampler", daemon=True)

    def _loop(self) -> None:
        with requests.Session() as session:
            session.trust_env = False
            while not self._stop.is_set():
                try:
                    cache = session.get(f"{self.backend_url}/health", timeout=5).json()["embedding_cache"]
                    self.samples.append((int(cache["bytes"]), int(cache["entries"]), int(cache["capacity_bytes"])))
                except (requests.RequestException, ValueError, KeyError):
                    self.failures += 1
                self._stop.wait(self.interval_s)

    @property
    def peak_bytes(self) -> int:
        return max((s[0] for s in self.samples), default=0)

    @property
    def capacity_bytes(self) -> int:
        return max((s[2] for s in self.samples), default=0)

    def __enter__(self) -> CacheSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def metric_value(metrics_text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample in Prometheus text, e.g. metric_value(t, "cache_bytes", 'cache="embeddings"')."""
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric == name and (not labels or labels in label_text):
            return float(value)
    return None


# --------------------------------------------------------------------------- the benchmark


def sam_env(engine: str, image_host: str, cache_mb: float, home: Path) -> dict[str, str]:
    """The SAM backend's environment for a load run (loopback images only, small caches)."""
    return {
        "SAM_ENGINE": DETERMINISTIC_ENGINE if engine == "deterministic" else engine,
        "EMBEDDING_CACHE_MB": str(cache_mb),
        "IMAGE_ALLOWED_HOSTS": image_host,
        "IMAGE_CACHE_DIR": str(home / "image-cache"),
        "LABEL_STUDIO_URL": "",
        "LABEL_STUDIO_API_KEY": "",
        "LOG_LEVEL": "WARNING",
        "OMP_NUM_THREADS": "1",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotators", type=int, default=8, help="concurrent annotators (default 8)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the concurrent phase (default 20)")
    parser.add_argument(
        "--reference-seconds",
        type=float,
        default=None,
        help="length of the single-annotator phase (default: seconds / 2)",
    )
    parser.add_argument("--engine", choices=("classic", "deterministic"), default="classic")
    parser.add_argument("--images", type=int, default=None, help="images used (default 2 per annotator)")
    parser.add_argument(
        "--cache-mb",
        type=float,
        default=None,
        help="EMBEDDING_CACHE_MB (default: room for about half the images' embeddings)",
    )
    parser.add_argument("--max-clicks", type=int, default=2000, help="cap on clicks per annotator")
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder")
    args = parser.parse_args(argv)

    from bench.common import emit, machine
    from devstack.backends import start_backend

    if not (args.data / "dsb2018" / "images").is_dir():
        print(f"error: DSB2018 not found under {args.data} (the shared/ folder beside the checkout)", file=sys.stderr)
        return 2
    count = args.images or 2 * args.annotators
    images = dsb2018_images(args.data, count)
    if args.cache_mb is not None:
        cache_mb = args.cache_mb
    else:  # about half the images fit: the cache must evict during the run
        per_image = (
            1.0 if args.engine == "deterministic" else float(np.mean([image.pixels.nbytes for image in images])) / 2**20
        )
        cache_mb = round(max(per_image * count / 2, 1.0), 2)
    extra = {
        "machine": machine(),
        "engine": args.engine,
        "annotators": args.annotators,
        "data": f"dsb2018 ({count} images, first by id)",
        "backend": "python -m sam on loopback",
    }
    reference_seconds = args.reference_seconds or args.seconds / 2

    with (
        tempfile.TemporaryDirectory(prefix="bench-load-") as scratch,
        ImageHost(args.data / "dsb2018" / "images") as host,
    ):
        home = Path(scratch)
        backend = start_backend("sam", sam_env(args.engine, host.netloc, cache_mb, home), home / "sam.log")
        try:
            with CacheSampler(backend.url) as sampler:
                # Single annotator first (its own images, cold cache): the reference.
                single = run_annotators(
                    backend.url,
                    host.url,
                    images[: max(1, count // args.annotators)],
                    1,
                    reference_seconds,
                    max_clicks=args.max_clicks,
                )
                many = run_annotators(
                    backend.url, host.url, images, args.annotators, args.seconds, max_clicks=args.max_clicks, seed=1
                )
            peak_rss = peak_rss_mb(backend.process.pid)
        finally:
            backend.stop()
    for run, name in ((single, "single"), (many, "concurrent")):
        if not run.ok_clicks:
            print(f"error: no successful click in the {name} phase: {run.problems[:3]}", file=sys.stderr)
            return 1
    single_p50 = percentile(single.latencies_ms(), 50)
    latencies = many.latencies_ms()
    failed = len(many.clicks) - len(many.ok_clicks)
    emit(
        "load_click_ms_p50",
        percentile(latencies, 50),
        "ms",
        single_p50,
        clicks=len(latencies),
        failed_clicks=failed,
        reference_is="single-annotator click p50",
        **extra,
    )
    emit(
        "load_click_ms_p99",
        percentile(latencies, 99),
        "ms",
        single_p50,
        clicks=len(latencies),
        reference_is="single-annotator click p50",
        **extra,
    )
    emit(
        "load_throughput",
        many.throughput(),
        "clicks/s",
        single.throughput(),
        seconds=round(many.seconds, 1),
        reference_is="single-annotator clicks/s",
        **extra,
    )
    emit("load_peak_rss", peak_rss, "MB", None, reference_is=None, source="/proc/PID/status VmHWM", **extra)
    emit(
        "load_peak_embedding_cache",
        sampler.peak_bytes / 2**20,
        "MB",
        sampler.capacity_bytes / 2**20,
        reference_is="EMBEDDING_CACHE_MB cap",
        samples=len(sampler.samples),
        **extra,
    )
    if many.problems:
        print(f"warning: {len(many.problems)} problems, e.g. {many.problems[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
