"""Embedding and click latency of the SAM backend, against bare segment-anything in the same run.

    python -m bench.sam_latency [--engine sam|sam2|sam3] [--model-type vit_b] [--device auto] [--tiny]

RANDOM weights (the same compute as Meta's checkpoints, which cannot be downloaded here) on
synthetic 1024x768 RGB images. Random weights make noise masks (a third of the pixels, RLEs of
~600k integers) where real checkpoints make smooth ones, so the backend's answers are built from a
smooth mask: the model still decodes every prompt (its time is counted), then its mask is replaced
by the ellipse inscribed in the box. Every figure says so in `answer_mask`.

Timers stop after `torch.cuda.synchronize()` on a GPU; every timed function runs once untimed first.
Figures (one JSON line each, via bench.common.emit):
- embed_ms: the engine's `embed` (SDPA attention, bf16 autocast) p50, against bare
  `SamPredictor.set_image` fp32; also bare bf16 and bare batched (bf16) per image.
- embed_images_per_s: a prewarm burst of --burst new images through the backend (Label Studio
  opening tasks), against bare fp32 `set_image` images/s.
- click_ms_cached p50 and p90 over --clicks smart rectangles through HTTP on an embedded image,
  against bare `SamPredictor.predict` p50.
- concurrent_click_ms p50 and p99: --annotators annotators clicking at once on embedded images.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import http.server
import io
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
from PIL import Image

from backends.devices import resolve_device
from backends.server.app import create_app
from backends.settings import Settings
from bench.common import emit, machine
from sam.engines.sam_fast_encoder import preprocess_batch
from sam.engines.segment_anything_engine import SamEngine, build_model, save_random_checkpoint
from sam.engines.segment_anything_loader import load_segment_anything
from sam.model import SamBackend

WIDTH, HEIGHT = 1024, 768
BOX = (300, 200, 520, 410)  # XYXY pixels
PROJECT = "1.1762076800"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Object"/></RectangleLabels>
</View>"""
BARE_NAMES = {  # engine -> (bare embedding call, bare prompt call)
    "sam": ("SamPredictor.set_image", "SamPredictor.predict"),
    "sam2": ("Sam2Model.get_image_embeddings", "Sam2Model(box)"),
    "sam3": ("Sam3TrackerModel.get_image_embeddings", "Sam3TrackerModel(box)"),
}
ANSWER_MASK = "ellipse inscribed in the box (the model's random-weight mask is decoded, then replaced)"


# ------------------------------------------------------------------------------------------ timing


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_ms(function: Callable[[], Any], repeats: int, device: str, warmup: int = 1) -> list[float]:
    """Wall times in ms of `repeats` calls after `warmup` untimed ones, synchronised on a GPU."""
    for _ in range(warmup):
        function()
    synchronise(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        synchronise(device)
        times.append(1000 * (time.perf_counter() - started))
    return times


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# ------------------------------------------------------------------------------------------ inputs


def synthetic_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def ellipse_in_box(box, height: int, width: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    rows, cols = np.ogrid[:height, :width]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 1), max((y1 - y0) / 2, 1)
    return ((cols - cx) / rx) ** 2 + ((rows - cy) / ry) ** 2 <= 1


class SmoothMaskEngine:
    """Runs the real engine's decoder, then answers with the ellipse in the box (see module doc)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.name, self.device = engine.name, getattr(engine, "device", "cpu")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def predict(self, embedding, box=None, points=None, point_labels=None):
        mask, score = self._engine.predict(embedding, box=box, points=points, point_labels=point_labels)
        synchronise(str(self.device))
        return ellipse_in_box(box, *mask.shape), score


class ImageServer:
    """Loopback HTTP server: /img<N>.png is a different synthetic image per N."""

    def __init__(self) -> None:
        pngs: dict[str, bytes] = {}
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with lock:
                    if self.path not in pngs:
                        pngs[self.path] = synthetic_png(len(pngs))
                    body = pngs[self.path]
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.host = f"127.0.0.1:{self.server.server_address[1]}"

    def url(self, n: int) -> str:
        return f"http://{self.host}/img{n}.png"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class BackendServer:
    """The real SAM backend app under uvicorn on a loopback port chosen by the OS."""

    def __init__(self, settings: Settings) -> None:
        import uvicorn

        self.app = create_app(SamBackend, settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._local = threading.local()

    def _http(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            self._local.session.trust_env = False
        return self._local.session

    def predict(self, image_url: str, task_id: int, context: dict | None) -> dict:
        body = {
            "tasks": [{"id": task_id, "data": {"image": image_url}}],
            "project": PROJECT,
            "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": context},
        }
        response = self._http().post(f"{self.url}/predict", json=body, timeout=600)
        response.raise_for_status()
        return response.json()

    def cache_entries(self) -> int:
        return self._http().get(f"{self.url}/health", timeout=10).json()["embedding_cache"]["entries"]

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def smart_rectangle(box=BOX) -> dict:
    x0, y0, x1, y1 = box
    value = {
        "x": 100 * x0 / WIDTH,
        "y": 100 * y0 / HEIGHT,
        "width": 100 * (x1 - x0) / WIDTH,
        "height": 100 * (y1 - y0) / HEIGHT,
        "rotation": 0,
        "rectanglelabels": ["Object"],
    }
    region = {
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "value": value,
        "id": "r1",
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }
    return {"result": [region]}


# ------------------------------------------------------------------------------------------ figures


def bare_figures(model_type: str, checkpoint: Path, device: str, repeats: int, batch: int) -> dict:
    """segment-anything as upstream examples use it: original attention, one SamPredictor."""
    sa = load_segment_anything()
    model = build_model(model_type, checkpoint).to(device)
    predictor = sa.SamPredictor(model)
    image = np.array(Image.open(io.BytesIO(synthetic_png(99))).convert("RGB"))
    device_type = "cuda" if device.startswith("cuda") else "cpu"

    def set_image_bf16():
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            predictor.set_image(image)

    inputs, _, _ = preprocess_batch(model, [image] * batch, device)

    def encoder_batched_bf16():
        with torch.inference_mode(), torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            model.image_encoder(inputs)

    figures: dict[str, float | list[float]] = {
        "fp32": statistics.median(timed_ms(lambda: predictor.set_image(image), repeats, device)),
        "bf16": statistics.median(timed_ms(set_image_bf16, repeats, device)),
        "batched_bf16": statistics.median(timed_ms(encoder_batched_bf16, max(1, repeats // 2), device)) / batch,
    }
    predictor.set_image(image)
    box = np.array(BOX, dtype=np.float32)
    figures["predict"] = timed_ms(lambda: predictor.predict(box=box, multimask_output=True), 30, device, warmup=3)
    return figures


def backend_figures(settings: Settings, burst: int, clicks: int, annotators: int, device: str) -> dict:
    images = ImageServer()
    backend = BackendServer(settings)
    store = backend.app.state.server.service.store  # the SamService startup returned
    store.engine = SmoothMaskEngine(store.engine)
    try:
        backend.predict(images.url(0), 1, smart_rectangle())  # embeds and caches image 0; warms up
        entries = backend.cache_entries()
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(burst) as pool:  # Label Studio opens `burst` tasks
            list(pool.map(lambda n: backend.predict(images.url(n), 100 + n, None), range(1, burst + 1)))
        while backend.cache_entries() < entries + burst:
            time.sleep(0.01)
        burst_s = time.perf_counter() - started
        click = timed_ms(lambda: backend.predict(images.url(0), 1, smart_rectangle()), clicks, "cpu", warmup=2)

        def annotator(n: int) -> list[float]:
            task = 1 + n % (burst + 1)
            url, task_id = (images.url(0), 1) if task == 1 else (images.url(task - 1), 100 + task - 1)
            return timed_ms(lambda: backend.predict(url, task_id, smart_rectangle()), max(5, clicks // 3), "cpu")

        with concurrent.futures.ThreadPoolExecutor(annotators) as pool:
            concurrent_clicks = [t for times in pool.map(annotator, range(annotators)) for t in times]
        batches = store.batcher.batches_run
    finally:
        backend.close()
        images.close()
    return {"burst_images_per_s": burst / burst_s, "click": click, "concurrent": concurrent_clicks, "batches": batches}


def hf_bare_figures(engine_name: str, checkpoint: Path, device: str, repeats: int, batch: int) -> dict:
    """transformers called directly (fp32; our torchvision-free preprocessing, which matches the
    library's processors exactly): `get_image_embeddings`, then the model with a box prompt."""
    from transformers import Sam2Model, Sam3TrackerModel

    from sam.engines import hf_common

    model_class = Sam2Model if engine_name == "sam2" else Sam3TrackerModel
    # ignored: transformers wraps PreTrainedModel.to with functools.wraps, which types it as unbound
    model = model_class.from_pretrained(checkpoint).to(device).eval()  # type: ignore[arg-type]
    size = int(model.config.prompt_encoder_config.image_size)
    default = hf_common.IMAGENET_DEFAULT if engine_name == "sam2" else hf_common.IMAGENET_STANDARD
    norm = hf_common.Normalisation.from_checkpoint(Path(checkpoint), size, default)
    image = np.array(Image.open(io.BytesIO(synthetic_png(99))).convert("RGB"))
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    pixels = hf_common.preprocess([image], norm).to(device)
    batched = hf_common.preprocess([image] * batch, norm).to(device)

    @torch.inference_mode()
    def embed(inputs, bf16: bool = False):
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
            return model.get_image_embeddings(inputs)

    features = embed(pixels)
    boxes = hf_common.prompt_tensors(BOX, None, None, (HEIGHT, WIDTH), size, device)

    @torch.inference_mode()
    def predict():
        return model(image_embeddings=features, multimask_output=True, **boxes)

    return {
        "fp32": statistics.median(timed_ms(lambda: embed(pixels), repeats, device)),
        "bf16": statistics.median(timed_ms(lambda: embed(pixels, True), repeats, device)),
        "batched_bf16": statistics.median(timed_ms(lambda: embed(batched, True), max(1, repeats // 2), device)) / batch,
        "predict": timed_ms(predict, 30, device, warmup=3),
    }


def engine_under_test(args: argparse.Namespace, workdir: Path, device: str) -> tuple[Any, Path, dict, dict]:
    """(the engine, its checkpoint, bare-library figures, Settings overrides) for --engine."""
    if args.engine == "sam":
        checkpoint = save_random_checkpoint(workdir / f"random_{args.model_type}.pth", args.model_type)
        bare = bare_figures(args.model_type, checkpoint, device, args.repeats, args.batch)
        sam = SamEngine(checkpoint=checkpoint, model_type=args.model_type, device=device, compile_encoder=args.compile)
        return sam, checkpoint, bare, {"sam_model_type": args.model_type, "sam_compile": args.compile}
    from sam.engines.hf_sam2 import Sam2Engine
    from sam.engines.hf_sam3 import Sam3Engine
    from sam.engines.hf_testing import save_random_sam2, save_random_sam3

    engine: Sam2Engine | Sam3Engine
    if args.engine == "sam2":
        checkpoint = save_random_sam2(workdir / "sam2", tiny=args.tiny)
        engine = Sam2Engine(checkpoint, device=device)
    else:
        checkpoint = save_random_sam3(workdir / "sam3", tiny=args.tiny, with_detector=False)
        engine = Sam3Engine(checkpoint, device=device, text=False)
    return engine, checkpoint, hf_bare_figures(args.engine, checkpoint, device, args.repeats, args.batch), {}


def run(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    workdir = Path(tempfile.mkdtemp(prefix="sam-latency-"))
    engine, checkpoint, bare, overrides = engine_under_test(args, workdir, device)
    image = np.array(Image.open(io.BytesIO(synthetic_png(98))).convert("RGB"))
    # partial, not a lambda: it holds the engine only while timed, so `del engine` below frees it
    engine_embed = statistics.median(timed_ms(functools.partial(engine.embed, image), args.repeats, device))
    batch = [image] * args.batch
    engine_batched = (
        statistics.median(timed_ms(functools.partial(engine.embed_batch, batch), max(1, args.repeats // 2), device))
        / args.batch
    )
    model_name = f"{engine.name}, random weights"
    del engine

    settings = Settings(
        sam_engine=args.engine,
        sam_checkpoint=str(checkpoint),
        device=device,
        image_cache_dir=workdir / "image-cache",
        embedding_cache_mb=4096,
        embed_batch=args.batch if device.startswith("cuda") else 0,
        image_allowed_hosts=("127.0.0.1",),
        **overrides,
    )
    served = backend_figures(settings, args.burst, args.clicks, args.annotators, device)

    common = {
        "machine": machine(),
        "device": device,
        "engine": args.engine,
        "model": model_name,
        "sam_options": f"SDPA attention, bf16 encoder, compiled: {args.compile}" if args.engine == "sam" else None,
        "data": f"synthetic {WIDTH}x{HEIGHT} RGB, box prompt",
        "answer_mask": ANSWER_MASK,
    }
    bare_predict = statistics.median(bare["predict"])
    return [
        emit(
            "embed_ms",
            engine_embed,
            "ms",
            bare["fp32"],
            baseline=f"bare {BARE_NAMES[args.engine][0]} fp32",
            bare_bf16_ms=round(bare["bf16"], 1),
            bare_batched_bf16_ms_per_image=round(bare["batched_bf16"], 1),
            engine_batched_ms_per_image=round(engine_batched, 1),
            batch=args.batch,
            repeats=args.repeats,
            **common,
        ),
        emit(
            "embed_images_per_s",
            served["burst_images_per_s"],
            "images/s",
            1000 / bare["fp32"],
            baseline=f"bare {BARE_NAMES[args.engine][0]} fp32, images/s",
            burst=args.burst,
            encoder_calls=served["batches"],
            **common,
        ),
        emit(
            "click_ms_cached_p50",
            statistics.median(served["click"]),
            "ms",
            bare_predict,
            baseline=f"bare {BARE_NAMES[args.engine][1]} p50 (no HTTP)",
            clicks=len(served["click"]),
            **common,
        ),
        emit(
            "click_ms_cached_p90",
            percentile(served["click"], 90),
            "ms",
            percentile(bare["predict"], 90),
            baseline=f"bare {BARE_NAMES[args.engine][1]} p90",
            clicks=len(served["click"]),
            **common,
        ),
        emit(
            "concurrent_click_ms_p50",
            statistics.median(served["concurrent"]),
            "ms",
            statistics.median(served["click"]),
            baseline="click_ms_cached_p50 (one annotator)",
            annotators=args.annotators,
            clicks=len(served["concurrent"]),
            **common,
        ),
        emit(
            "concurrent_click_ms_p99",
            percentile(served["concurrent"], 99),
            "ms",
            statistics.median(served["click"]),
            baseline="click_ms_cached_p50 (one annotator)",
            annotators=args.annotators,
            clicks=len(served["concurrent"]),
            **common,
        ),
    ]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="sam", choices=sorted(BARE_NAMES))
    parser.add_argument("--tiny", action="store_true", help="sam2/sam3: tiny random models (overheads only)")
    parser.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "vit_tiny"])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--repeats", type=int, default=2, help="embeddings timed per method")
    parser.add_argument("--batch", type=int, default=2, help="images per batched encoder call")
    parser.add_argument("--burst", type=int, default=3, help="new images opened at once (prewarm burst)")
    parser.add_argument("--clicks", type=int, default=30, help="clicks timed on a cached image")
    parser.add_argument("--annotators", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="SAM_COMPILE=1 (torch.compile the encoder)")
    return parser


def main(argv: list[str] | None = None) -> None:
    run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
