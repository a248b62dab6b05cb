"""Hostile images, served from loopback, driven through the real backends' /predict.

SAM: an interactive smart rectangle (engine: RedEngine, whose mask is the red pixels in the box,
so the frame the engine saw is visible in the answer). Segmentation: batch predictions with a tiny
model that labels every pixel "Nucleus".

Documented behaviour asserted here:
- an image that cannot be used gives a 4xx `{"error": ...}` naming the problem (422 unreadable or
  unreachable, 403 forbidden source) for an interactive call and for a single-task prediction;
  within a batch of several tasks (Label Studio's "Retrieve predictions") that task gets an empty
  result and the others are predicted;
- odd but valid images (16-bit, palette, CMYK, EXIF-rotated) are predicted, EXIF-rotated ones in
  the rotated frame with matching original_width / original_height;
- the server keeps serving, and nothing from a failed image stays in the image or embedding cache.
"""

from __future__ import annotations

import dataclasses
import io
import time

import numpy as np
import pytest
from PIL import Image

from backends.images.disk_cache import cache_file_name
from backends.images.fetcher import ImageFetcher
from backends.masks.rle import decode_rle
from tests.reliability.checks import check_answer, check_healthy, describe
from tests.reliability.conftest import base_settings, sam_client, segmentation_client
from tests.support import payloads
from tests.support.engines import RED_ENGINE
from tests.support.http_host import HttpHost, Reply, SilentSocket
from tests.support.images import (
    encode,
    jpeg_with_orientation,
    noisy_rgb,
    png,
    png_header_only,
    quadrant_rgb,
    truncated,
)

FETCH_TIMEOUT_S = 0.5


def _corpus(secret_url: str) -> dict[str, Reply | bytes]:
    noisy = noisy_rgb(64, 64)
    gradient = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 20).astype(np.uint16)
    return {
        # valid, if unusual
        "/good.png": png(quadrant_rgb(24, 32)),
        "/gray16.png": encode(Image.fromarray(gradient)),
        "/palette.png": encode(Image.fromarray(quadrant_rgb(24, 32)).convert("P", palette=Image.Palette.ADAPTIVE)),
        "/cmyk.jpg": encode(Image.fromarray(quadrant_rgb(24, 32)).convert("CMYK"), "JPEG", quality=95),
        "/exif6.jpg": jpeg_with_orientation(quadrant_rgb(40, 60), 6),
        # hostile
        "/empty.png": b"",
        "/truncated.png": truncated(png(noisy)),
        "/truncated.jpg": truncated(encode(Image.fromarray(noisy), "JPEG", quality=90)),
        "/page.html": Reply(
            200, b"<!doctype html><html><body>Please log in</body></html>", {"Content-Type": "text/html"}
        ),
        "/bomb.png": png_header_only(50_000, 50_000),
        "/error500": Reply(500, b"upstream broke"),
        "/loop": Reply(302, b"", {"Location": "/loop"}),
        "/escape": Reply(302, b"", {"Location": f"{secret_url}/internal.png"}),
        "/to-metadata": Reply(302, b"", {"Location": "http://169.254.169.254/latest/meta-data/iam/"}),
        "/to-file": Reply(302, b"", {"Location": "file:///etc/passwd"}),
    }


# path -> (HTTP status, part of the error message)
FAILURES = {
    "/empty.png": (422, "empty"),
    "/truncated.png": (422, "not a readable image"),
    "/truncated.jpg": (422, "not a readable image"),
    "/page.html": (422, "HTML"),
    "/bomb.png": (422, "too large"),
    "/error500": (422, "HTTP 500"),
    "/loop": (422, "too many redirects"),
    "/escape": (403, "IMAGE_ALLOWED_HOSTS"),
    "/to-metadata": (403, "metadata"),
    "/to-file": (403, "scheme"),
    "silent": (422, "timed out"),
}
VALID = ("/gray16.png", "/palette.png", "/cmyk.jpg")


@dataclasses.dataclass
class Setup:
    images: HttpHost
    silent: SilentSocket
    secret: HttpHost
    clients: dict
    cache_dirs: dict

    def url(self, path: str) -> str:
        return f"{self.silent.url}/never.png" if path == "silent" else f"{self.images.url}{path}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, constant_model):
    tmp = tmp_path_factory.mktemp("hostile")
    # A loopback "internal service" outside the allow-list: it must never be asked for anything.
    with HttpHost(app=lambda request: Reply(200, png(quadrant_rgb(8, 8)))) as secret, SilentSocket() as silent:
        secret_url = f"http://localhost:{secret.port}"
        with HttpHost(_corpus(secret_url)) as images:
            allowed = (images.netloc, silent.url.split("//")[1])
            common = dict(image_allowed_hosts=allowed, image_fetch_timeout_s=FETCH_TIMEOUT_S, image_fetch_retries=1)
            sam_settings = base_settings(tmp / "sam", sam_engine=RED_ENGINE, **common)
            seg_settings = base_settings(tmp / "seg", seg_checkpoint=str(constant_model), **common)
            with sam_client(sam_settings) as sam, segmentation_client(seg_settings) as seg:
                for client in (sam, seg):
                    client.app.state.server.runtime.label_studio.backoff_s = 0.05
                yield Setup(
                    images,
                    silent,
                    secret,
                    {"sam": sam, "segmentation": seg},
                    {"sam": sam_settings.image_cache_dir, "segmentation": seg_settings.image_cache_dir},
                )


WHOLE_IMAGE = payloads.rectangle(0, 0, 100, 100)


def interactive(client, url: str, task_id: int = 1):
    return client.post("/predict", json=payloads.predict_body([payloads.task(task_id, url)], {"result": [WHOLE_IMAGE]}))


def batch(client, urls: list[str], first_id: int = 1):
    tasks = [payloads.task(first_id + index, url) for index, url in enumerate(urls)]
    return client.post("/predict", json=payloads.predict_body(tasks))


def embedding_entries(setup: Setup) -> int:
    return check_healthy(setup.clients["sam"].get)["embedding_cache"]["entries"]


def cached(setup: Setup, backend: str, url: str, task_id: int) -> bool:
    directory = setup.cache_dirs[backend]
    return (directory / cache_file_name(ImageFetcher.identity(url, task_id))).exists()


def assert_still_serving(setup: Setup, backend: str) -> None:
    client = setup.clients[backend]
    check_healthy(client.get)
    good = setup.url("/good.png")
    response = interactive(client, good) if backend == "sam" else batch(client, [good])
    assert response.status_code == 200, describe(response)
    assert response.json()["results"][0]["result"], "a good image must still give a region"


@pytest.mark.parametrize("path", list(FAILURES))
def test_sam_interactive_refuses_with_a_clear_4xx(setup, path):
    status, message = FAILURES[path]
    client = setup.clients["sam"]
    entries_before = embedding_entries(setup)
    task_id = 100 + list(FAILURES).index(path)
    started = time.monotonic()
    response = interactive(client, setup.url(path), task_id)
    check_answer(response)
    assert response.status_code == status, describe(response)
    assert message in response.json()["error"], describe(response)
    # Bounded: at most two attempts of the fetch timeout each, plus a short backoff.
    assert time.monotonic() - started < 2 * (4 * FETCH_TIMEOUT_S) + 1.0
    assert embedding_entries(setup) == entries_before
    assert not cached(setup, "sam", setup.url(path), task_id)
    assert_still_serving(setup, "sam")


@pytest.mark.parametrize("path", list(FAILURES))
def test_segmentation_single_task_refuses_and_batch_gives_an_empty_result(setup, path):
    status, message = FAILURES[path]
    client = setup.clients["segmentation"]
    task_id = 200 + list(FAILURES).index(path)
    single = batch(client, [setup.url(path)], task_id)
    check_answer(single)
    assert single.status_code == status and message in single.json()["error"], describe(single)

    mixed = batch(client, [setup.url("/good.png"), setup.url(path)], task_id)
    assert mixed.status_code == 200, describe(mixed)
    good, bad = mixed.json()["results"]
    assert bad["result"] == [] and bad["score"] == 0.0 and bad["model_version"]
    assert good["result"] and good["result"][0]["original_width"] == 32 and good["result"][0]["original_height"] == 24
    assert not cached(setup, "segmentation", setup.url(path), task_id)
    assert not cached(setup, "segmentation", setup.url(path), task_id + 1)
    assert_still_serving(setup, "segmentation")


def test_bounded_retries_on_a_server_error(setup):
    before = setup.images.hits("/error500")
    response = interactive(setup.clients["sam"], setup.url("/error500"), 990)
    assert response.status_code == 422
    assert setup.images.hits("/error500") - before == 2  # IMAGE_FETCH_RETRIES=1: one retry, no more


def test_redirects_out_of_the_allow_list_never_reach_the_target(setup):
    for backend in ("sam", "segmentation"):
        response = (
            interactive(setup.clients[backend], setup.url("/escape"), 991)
            if backend == "sam"
            else batch(setup.clients[backend], [setup.url("/escape")], 991)
        )
        assert response.status_code == 403, describe(response)
    assert setup.secret.requests == []


@pytest.mark.parametrize("path", VALID)
@pytest.mark.parametrize("backend", ["sam", "segmentation"])
def test_unusual_but_valid_images_are_predicted(setup, backend, path):
    client = setup.clients[backend]
    response = interactive(client, setup.url(path)) if backend == "sam" else batch(client, [setup.url(path)])
    assert response.status_code == 200, describe(response)
    (region, *_) = response.json()["results"][0]["result"]
    width, height = Image.open(io.BytesIO(_corpus("http://x")[path])).size
    assert (region["original_width"], region["original_height"]) == (width, height)
    mask = decode_rle(region["value"]["rle"], height, width)
    if backend == "sam" and path != "/gray16.png":
        # RedEngine: the red top-left quadrant of the 32x24 image, whatever the file's pixel mode.
        assert mask[:12, :16].all() and not mask[12:, :].any() and not mask[:, 16:].any()


def test_exif_rotated_photo_sam_mask_is_in_the_rotated_frame(setup):
    """Stored 60 wide x 40 high with Orientation 6 (shown rotated 90 degrees clockwise): Label Studio
    shows it 40 wide x 60 high, with the stored top-left (red) quadrant at the top right."""
    response = interactive(setup.clients["sam"], setup.url("/exif6.jpg"))
    assert response.status_code == 200, describe(response)
    (region,) = response.json()["results"][0]["result"]
    assert (region["original_width"], region["original_height"]) == (40, 60)
    mask = decode_rle(region["value"]["rle"], 60, 40)
    assert mask[2:28, 22:38].all()  # top right, away from JPEG-blurred edges
    assert not mask[32:, :].any() and not mask[:, :18].any()


def test_exif_rotated_photo_segmentation_answer_has_the_rotated_size(setup):
    response = batch(setup.clients["segmentation"], [setup.url("/exif6.jpg")])
    assert response.status_code == 200, describe(response)
    (region, *_) = response.json()["results"][0]["result"]
    assert (region["original_width"], region["original_height"]) == (40, 60)
    assert decode_rle(region["value"]["rle"], 60, 40).all()  # the constant model: every pixel
