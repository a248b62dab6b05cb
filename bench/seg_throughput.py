"""Pre-annotation throughput of the segmentation backend over HTTP vs the model's own inference.

    python -m bench.seg_throughput [--images N] [--train-seconds S] [--data ../shared/data]

A real server (uvicorn on a loopback port) serves SegmentationBackend; the images are served by a
second loopback HTTP server, as Label Studio's storage would. One /predict request carries all
tasks, as "Retrieve predictions" on a project does. The reference is the same model's inference
(`segment_images`: normalise, tiled forward pass, softmax) on the already decoded images, in the
same run, so the ratio is the cost of everything around the network (HTTP, fetching, decoding,
RLE encoding, polygons). The model is trained for a few seconds first so that its masks, and
thus the regions encoded, look like real ones (random weights give speckle).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import http.server
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch
import uvicorn
from PIL import Image

from backends.server.app import create_app
from backends.settings import Settings
from bench.common import emit
from segmentation.data import Sample, read_image
from segmentation.model import SegmentationBackend
from segmentation.tiled_inference import segment_images
from segmentation.trainer import TrainConfig, train
from segmentation.versions import load_current

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Nucleus"/></BrushLabels>
</View>"""


def load_images(data: Path, count: int) -> tuple[list[Sample], str]:
    """DSB2018 images with foreground masks (first `count` by name), or synthetic ones when absent."""
    root = data / "dsb2018"
    if (root / "images").is_dir():
        paths = sorted((root / "images").glob("*.png"))[:count]
        samples = [
            Sample(p.stem, read_image(p), (np.array(Image.open(root / "labels" / p.name)) > 0).astype(np.uint8))
            for p in paths
        ]
        sizes = sorted({f"{s.image.shape[1]}x{s.image.shape[0]}" for s in samples})
        return samples, f"dsb2018: first {len(samples)} images by name ({', '.join(sizes)})"
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        image = rng.integers(0, 40, (256, 320, 3)).astype(np.uint8)
        mask = np.zeros((256, 320), np.uint8)
        for _ in range(10):
            r, c = rng.integers(10, 246), rng.integers(10, 310)
            mask[r - 6 : r + 6, c - 6 : c + 6] = 1
        image[mask == 1] = 200
        samples.append(Sample(f"synthetic-{i}", image, mask))
    return samples, f"synthetic: {count} images 320x256 (../shared/data not found)"


def serve_folder(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve_backend(settings: Settings) -> tuple[uvicorn.Server, str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    app = create_app(SegmentationBackend, settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError("the backend did not start within 60 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seg_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24, help="tasks per /predict request (default 24)")
    parser.add_argument("--train-seconds", type=float, default=20.0, help="training before measuring (default 20)")
    parser.add_argument("--repeats", type=int, default=2, help="timed requests (best is reported)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    samples, data = load_images(args.data, args.images)
    machine = f"{platform.machine()} {torch.get_num_threads()} torch threads, cpu"

    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        model_dir = scratch / "models"
        train(samples, ["Nucleus"], model_dir, TrainConfig(minutes=args.train_seconds / 60, device="cpu"))
        folder = scratch / "images"
        folder.mkdir()
        for sample in samples:
            Image.fromarray(sample.image).save(folder / f"{sample.name}.png")
        image_server, image_host = serve_folder(folder)
        settings = dataclasses.replace(
            Settings(),
            model_dir=model_dir,
            device="cpu",
            image_allowed_hosts=(image_host,),
            image_cache_dir=scratch / "cache",
            image_cache_mb=0.0,
        )  # no cache: every image is fetched
        backend, url = serve_backend(settings)
        try:
            tasks = [
                {"id": i + 1, "data": {"image": f"http://{image_host}/{s.name}.png"}} for i, s in enumerate(samples)
            ]
            body = {
                "tasks": tasks,
                "project": "1.1700000000",
                "label_config": CONFIG,
                "params": {"login": None, "password": None, "context": None},
            }
            requests.post(f"{url}/predict", json=body | {"tasks": tasks[:1]}, timeout=300).raise_for_status()
            http_s = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                response = requests.post(f"{url}/predict", json=body, timeout=600)
                http_s.append(time.perf_counter() - started)
                response.raise_for_status()
                results = response.json()["results"]
                assert len(results) == len(tasks) and all(r["model_version"] != "untrained" for r in results)
            regions = sum(len(r["result"]) for r in results)

            model = load_current(model_dir, "cpu")
            if model is None:
                raise SystemExit(f"training wrote no model version under {model_dir}")
            images = [s.image for s in samples]
            raw_s = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                segment_images(model.network, images, model.device)
                raw_s.append(time.perf_counter() - started)
        finally:
            backend.should_exit = True
            image_server.shutdown()
            image_server.server_close()
    emit(
        "seg_preannotation_throughput",
        len(tasks) / min(http_s),
        "images/s",
        len(tasks) / min(raw_s),
        machine=machine,
        data=data,
        tasks_per_request=len(tasks),
        regions=regions,
        reference_is="segment_images on decoded images (same model, same run)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
