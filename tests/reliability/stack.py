"""Real backend processes on loopback against a stand-in Label Studio, for the concurrency and
fault tests (both marked e2e).

- `launch(name, env, home)`: `python -m sam|segmentation` on a free loopback port (devstack);
- `StandInLabelStudio`: a `FakeLabelStudio` serving project 1 (its export and uploaded cell
  images), started at once, stoppable and restartable on the same port;
- requests as Label Studio sends them (`seg_predict`, `start_training`), and `project_state`;
- `check_own_mask`: a SAM answer is exactly the deterministic engine's for that image and prompt.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests

from bench.load import Click
from devstack.backends import Backend, start_backend
from tests.support import payloads
from tests.support.engines import expected_mask, expected_score, image_signature
from tests.support.http_host import PNG, Reply
from tests.support.images import png
from tests.support.label_studio import FakeLabelStudio

SEG_CONFIG = payloads.BRUSH_CONFIG


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
    base = {
        "IMAGE_CACHE_DIR": str(home / "image-cache"),
        "LOG_LEVEL": "INFO",
        "OMP_NUM_THREADS": "1",
        "LABEL_STUDIO_URL": "",
        "LABEL_STUDIO_API_KEY": "",
    }
    return start_backend(name, {**base, **env}, home / f"{name}.log", timeout=90)


class StandInLabelStudio(FakeLabelStudio):
    """What the backends read from Label Studio 1.23, started at once; `stop()` and `start()` take it
    down and back on the same port (a Label Studio that goes down and comes back).

    Project 1 (`label_config`), tasks `images` {task id: (HxWx3 image, HxW truth)} uploaded as
    /data/upload/1/cells-<id>.png; tasks in `annotated` have one brush annotation made from their
    truth. Everything but /health needs the legacy token (`legacy_token`).
    """

    def __init__(
        self, images: dict[int, tuple[np.ndarray, np.ndarray]], annotated: set[int], label_config: str = SEG_CONFIG
    ):
        super().__init__()
        self.images = images
        self.projects[1] = label_config
        for task_id, (image, _) in images.items():
            self.files[self.upload_path(task_id)] = Reply(200, png(image), PNG)
        self.exports[1] = [
            self.task(task_id)
            | {
                "annotations": [
                    payloads.annotation(
                        10 * task_id, [payloads.brush(images[task_id][1], region_id=f"r{10 * task_id}")]
                    )
                ]
            }
            for task_id in sorted(annotated)
        ]
        self.start()

    @staticmethod
    def upload_path(task_id: int) -> str:
        return f"/data/upload/1/cells-{task_id}.png"

    def task(self, task_id: int) -> dict:
        return payloads.task(task_id, self.upload_path(task_id))


def seed_model(model_dir: Path, labels: tuple[str, ...] = ("Nucleus",)) -> str:
    """Write a complete (randomly initialised) model version for project 1, as the trainer does;
    returns its version name."""
    import torch

    from segmentation.network import NetworkConfig, build_network
    from segmentation.versions import save_version

    torch.manual_seed(0)
    config = NetworkConfig(n_classes=len(labels) + 1)
    info = save_version(
        model_dir / "project-1",
        build_network(config).state_dict(),
        labels=labels,
        network=config,
        metrics={"val_dice": dict.fromkeys(labels)},
        training={"seeded_by": "test"},
    )
    return info.version


def seg_predict(client: requests.Session, backend: Backend, task: dict, timeout_s: float = 30.0) -> requests.Response:
    body = payloads.predict_body([task], config=SEG_CONFIG)
    return client.post(f"{backend.url}/predict", json=body, timeout=timeout_s)


def project_state(client: requests.Session, backend: Backend) -> dict:
    return client.get(f"{backend.url}/health", timeout=5).json().get("projects", {}).get("1", {})


def start_training(client: requests.Session, backend: Backend) -> None:
    began = time.monotonic()
    response = client.post(
        f"{backend.url}/webhook", json=payloads.webhook_body("START_TRAINING", config=SEG_CONFIG), timeout=5
    )
    assert response.status_code == 200 and response.json()["status"] == "ok", response.text
    assert time.monotonic() - began < 1.0, "Label Studio waits 1 s for a webhook"


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
        return (
            f"region is for a {region['original_width']}x{region['original_height']} image, "
            f"this one is {image.width}x{image.height}"
        )
    signature = image_signature(image.pixels)
    mask = decode_rle(region["value"]["rle"], image.height, image.width)
    expected = expected_mask(signature, image.height, image.width, prompt.box, prompt.points, prompt.point_labels)
    if not np.array_equal(mask, expected):
        return f"mask differs from this image's and prompt's in {int((mask != expected).sum())} pixels"
    if abs(prediction["score"] - expected_score(signature)) > 1e-9:
        return f"score {prediction['score']} is not this image's ({expected_score(signature)})"
    return None
