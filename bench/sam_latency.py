"""Click and embedding latency of the SAM backend: `python -m bench.sam_latency [--model-type vit_b]`.

SAM with RANDOM weights (the same compute as Meta's checkpoints, which cannot be downloaded here)
on a synthetic 1024x768 RGB image, on this machine's device (DEVICE=auto). Figures:
- embed_ms: the engine's `embed` (bf16 autocast on the image encoder), reference: bare
  segment-anything `SamPredictor.set_image` (fp32) on the same model and image.
- click_ms_cached: p50 of an interactive smart-rectangle `/predict` over real HTTP (uvicorn on
  loopback) on an image whose embedding is cached; reference: bare `SamPredictor.predict` p50
  with the same box and model.
- click_ms_first_after_prewarm: the first click on a fresh image after Label Studio's
  "task opened" `/predict` without context has prewarmed it; reference: click_ms_cached.
"""
from __future__ import annotations

import argparse
import http.server
import io
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from backends.server import create_app
from backends.settings import Settings
from bench.common import emit, machine
from sam.engines.segment_anything_engine import SamEngine, build_model, save_random_checkpoint
from sam.engines.segment_anything_loader import load_segment_anything
from sam.model import SamBackend

WIDTH, HEIGHT = 1024, 768
BOX = [300.0, 200.0, 520.0, 410.0]  # XYXY pixels
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Object"/></RectangleLabels>
</View>"""


def synthetic_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class ImageServer:
    """Loopback HTTP server: /img<N>.png is a different synthetic image per N."""

    def __init__(self) -> None:
        pngs: dict[str, bytes] = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
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

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class BackendServer:
    """The real backend app under uvicorn on a loopback port chosen by the OS."""

    def __init__(self, settings: Settings) -> None:
        import uvicorn

        app = create_app(SamBackend, settings)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.http = requests.Session()
        self.http.trust_env = False

    def predict(self, image_url: str, task_id: int, context: dict | None) -> dict:
        body = {
            "tasks": [{"id": task_id, "data": {"image": image_url}}],
            "project": "1.1762076800",
            "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": context},
        }
        response = self.http.post(f"{self.url}/predict", json=body, timeout=600)
        response.raise_for_status()
        return response.json()

    def cache_entries(self) -> int:
        return self.http.get(f"{self.url}/health", timeout=10).json()["embedding_cache"]["entries"]

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def smart_rectangle() -> dict:
    x0, y0, x1, y1 = BOX
    value = {
        "x": 100 * x0 / WIDTH, "y": 100 * y0 / HEIGHT, "width": 100 * (x1 - x0) / WIDTH,
        "height": 100 * (y1 - y0) / HEIGHT, "rotation": 0, "rectanglelabels": ["Object"],
    }
    region = {"original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0, "value": value,
              "id": "r1", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "origin": "manual"}
    return {"result": [region]}


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(1000 * (time.perf_counter() - started))
    return times


def run(model_type: str, embed_repeats: int, click_repeats: int, device: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sam-latency-"))
    checkpoint = save_random_checkpoint(workdir / f"random_{model_type}.pth", model_type)
    image = np.array(Image.open(io.BytesIO(synthetic_png(99))).convert("RGB"))
    sa = load_segment_anything()

    # Bare segment-anything, as upstream examples use it (fp32, one predictor).
    bare_model = build_model(model_type, checkpoint)
    engine_device = SamEngine(checkpoint=checkpoint, model_type=model_type, device=device)
    bare_model = bare_model.to(engine_device.device)
    predictor = sa.SamPredictor(bare_model)
    bare_embed = timed(lambda: predictor.set_image(image), embed_repeats)
    bare_click = timed(lambda: predictor.predict(box=np.array(BOX), multimask_output=True), click_repeats + 1)[1:]
    engine_embed = timed(lambda: engine_device.embed(image), embed_repeats)  # (set_image above warmed up torch)
    engine_name_device = f"{engine_device.device}, bf16 encoder: {engine_device.bf16}"
    del bare_model, predictor, engine_device

    images = ImageServer()
    settings = Settings(
        sam_engine="sam", sam_checkpoint=str(checkpoint), sam_model_type=model_type, device=device,
        image_allowed_hosts=(images.host,), image_cache_dir=workdir / "image-cache", embedding_cache_mb=512,
    )
    backend = BackendServer(settings)
    try:
        cached_url = f"http://{images.host}/img0.png"
        backend.predict(cached_url, 1, smart_rectangle())  # computes and caches the embedding
        http_click = timed(lambda: backend.predict(cached_url, 1, smart_rectangle()), click_repeats)
        first_clicks = []
        for n in range(1, embed_repeats + 1):
            url = f"http://{images.host}/img{n}.png"
            entries = backend.cache_entries()
            backend.predict(url, 100 + n, None)  # Label Studio opens the task: prewarm
            while backend.cache_entries() <= entries:
                time.sleep(0.05)
            first_clicks += timed(lambda: backend.predict(url, 100 + n, smart_rectangle()), 1)
    finally:
        backend.close()
        images.close()
        for path in workdir.rglob("*"):
            if path.is_file():
                path.unlink()

    p50 = statistics.median
    common = {
        "machine": machine(),
        "device": engine_name_device,
        "model": f"{model_type}, random weights",
        "data": f"synthetic {WIDTH}x{HEIGHT} RGB, box prompt",
    }
    emit("embed_ms", round(p50(engine_embed), 1), "ms", round(p50(bare_embed), 1),
         baseline="bare SamPredictor.set_image (fp32)", repeats=embed_repeats, **common)
    emit("click_ms_cached", round(p50(http_click), 1), "ms", round(p50(bare_click), 1),
         baseline="bare SamPredictor.predict p50 (no HTTP)", repeats=click_repeats, **common)
    emit("click_ms_first_after_prewarm", round(p50(first_clicks), 1), "ms", round(p50(http_click), 1),
         baseline="click_ms_cached", repeats=len(first_clicks), **common)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "vit_tiny"])
    parser.add_argument("--embed-repeats", type=int, default=2, help="embeddings timed per method (default 2)")
    parser.add_argument("--click-repeats", type=int, default=15, help="clicks timed per method (default 15)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    run(args.model_type, args.embed_repeats, args.click_repeats, args.device)


if __name__ == "__main__":
    main()
