"""Decode work and memory per request (issue 8, items 5 and 6), measured.

- A progressive JPEG with one scan repeated 1,500 times (36 KB, 2.25 MP) cost seconds of CPU per
  request: it is refused (422 naming IMAGE_MAX_JPEG_SCANS) from its markers, before decoding,
  scans hidden behind junk bytes included; ordinary progressive JPEGs still decode.
- 16-bit and float images went through float64 copies of the whole image (+540 MB for a 45 KB
  20 MP PNG): they are scaled to 8 bits a block of rows at a time (peak RSS measured in a fresh
  subprocess).
- Decoded pixels held at once are bounded per process (DECODE_MAX_INFLIGHT_MEGAPIXELS); a decode
  that cannot get its share within DECODE_WAIT_TIMEOUT is answered 503, and the server serves on.
- Segmentation inference held C x H x W floats of the whole image several times: it now holds a
  band of one tile's height (peak RSS in a subprocess); a prediction whose masks are so
  fragmented that their brush RLE passes SEG_MAX_RLE_MB leaves those labels out, with a note.
- Training held every decoded image in memory: samples now go to disk as they are made, and the
  crops and scores read back from disk are exactly those from memory.

Settings are built with `Settings.from_env`, so the same tests run (and fail) against code that
lacks the limits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import backends
import backends.images.fetcher
from backends.errors import ImageUnavailable
from backends.images.decode import decode_image
from backends.masks.rle import decode_rle
from backends.settings import Settings
from tests.reliability.checks import check_healthy, describe
from tests.reliability.conftest import sam_client, segmentation_client
from tests.support import payloads
from tests.support.engines import RED_ENGINE
from tests.support.http_host import PNG, HttpHost, Reply
from tests.support.images import encode
from tests.support.label_studio import FakeLabelStudio

THIS_MODULE = __name__
REPO_ROOT = Path(backends.__file__).resolve().parents[1]  # the code under test (a base checkout too)
WHOLE_IMAGE = payloads.rectangle(0, 0, 100, 100)


def settings_for(tmp: Path, env: dict[str, str] | None = None, **fields) -> Settings:
    """In-process backend settings from `env` (variables unknown to the code are ignored) plus fields."""
    defaults = dict(
        image_cache_dir=tmp / "image-cache",
        model_dir=tmp / "models",
        image_fetch_timeout_s=5.0,
        image_fetch_retries=0,
        embedding_cache_mb=64,
        device="cpu",
    )
    return dataclasses.replace(Settings.from_env(env or {}), **(defaults | fields))


def interactive(client, url: str, task_id: int = 1):
    body = payloads.predict_body([payloads.task(task_id, url)], {"result": [WHOLE_IMAGE]})
    return client.post("/predict", json=body)


# Peak resident memory of this process in MiB. Not ru_maxrss: a child inherits its parent's
# (pytest's) high-water mark through fork and exec; VmHWM belongs to the process's own memory map.
PEAK_MB = """
def peak_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
"""


def measure_in_subprocess(script: str, *args: str, timeout_s: float = 90) -> dict:
    """Run `script` (which may call `peak_mb()`) in a fresh interpreter on the code under test; it
    prints one JSON line last."""
    script = PEAK_MB + script
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO_ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- item 5: JPEG scan bomb


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment of a well-formed JPEG; a scan's entropy-coded
    data belongs to its SOS segment. (Independent of the backend's own parser.)"""
    segments, position = [], 2
    while position < len(data):
        marker = data[position + 1]
        if marker == 0xD9:
            segments.append((marker, position, position + 2))
            break
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        segments.append((marker, position, end))
        position = end
    return segments


def scan_bomb(side: int, repeats: int, junk: bytes = b"") -> bytes:
    """A progressive JPEG of side x side grey-ish pixels whose last scan (an AC refinement, the
    dearest to decode) is spliced in `repeats` more times before EOI, each copy after `junk`."""
    pixels = np.zeros((side, side, 3), np.uint8)
    pixels[::16] = 40
    data = encode(Image.fromarray(pixels), "JPEG", progressive=True, quality=75)
    segments = jpeg_segments(data)
    _, start, end = [segment for segment in segments if segment[0] == 0xDA][-1]
    eoi = segments[-1][1]
    return data[:eoi] + (junk + data[start:end]) * repeats + data[eoi:]


@pytest.fixture(scope="module")
def jpeg_host():
    files = {
        "/bomb.jpg": Reply(200, scan_bomb(1500, 1500), {"Content-Type": "image/jpeg"}),
        "/progressive.jpg": Reply(200, scan_bomb(1500, 0), {"Content-Type": "image/jpeg"}),
    }
    with HttpHost(files) as host:
        yield host


def test_a_progressive_jpeg_with_1500_scans_is_refused_before_decoding(jpeg_host, tmp_path):
    settings = settings_for(tmp_path, sam_engine=RED_ENGINE, image_allowed_hosts=(jpeg_host.netloc,))
    with sam_client(settings) as client:
        started = time.monotonic()
        response = interactive(client, f"{jpeg_host.url}/bomb.jpg")
        elapsed = time.monotonic() - started
        assert response.status_code == 422, describe(response)
        assert "IMAGE_MAX_JPEG_SCANS" in response.json()["error"]
        assert elapsed < 1.0, f"the bomb cost {elapsed:.1f} s before it was refused"
        # An ordinary progressive JPEG (10 scans) of the same size is served as before.
        good = interactive(client, f"{jpeg_host.url}/progressive.jpg", task_id=2)
        assert good.status_code == 200, describe(good)
        check_healthy(client.get)


def test_scans_hidden_behind_junk_bytes_are_counted_too():
    """libjpeg skips bytes it does not understand between segments and decodes the scans after
    them; the count must not stop at the first irregularity."""
    bomb = scan_bomb(600, 1500, junk=b"\x12\x34\xff\xff")
    started = time.monotonic()
    with pytest.raises(ImageUnavailable, match="IMAGE_MAX_JPEG_SCANS"):
        decode_image(bomb, 10**8, name="bomb")
    assert time.monotonic() - started < 0.5


# --------------------------------------------------------------------------- item 6: 16-bit and float


DECODE_SCRIPT = """
import json, sys, time
from backends.images.decode import decode_image
data = open(sys.argv[1], "rb").read()
before = peak_mb()
started = time.perf_counter()
pixels = decode_image(data, 200_000_000)
print(json.dumps({"peak_mb": peak_mb() - before, "s": time.perf_counter() - started,
                  "shape": list(pixels.shape), "top": int(pixels.max())}))
"""


@pytest.mark.parametrize("kind", ["16-bit PNG", "float TIFF"])
def test_a_20_megapixel_16_bit_or_float_image_decodes_without_float64_copies(kind, tmp_path):
    side = 4472  # 20 MP
    if kind == "16-bit PNG":
        samples = np.zeros((side, side), np.uint16)
        samples[::7, ::5] = 4000
        path, fmt, options = tmp_path / "wide.png", "PNG", {}
    else:
        samples = np.zeros((side, side), np.float32)
        samples[::7, ::5] = 0.5
        path, fmt, options = tmp_path / "wide.tif", "TIFF", {"compression": "tiff_deflate"}
    Image.fromarray(samples).save(path, fmt, **options)
    del samples
    assert path.stat().st_size < 200_000  # a small download
    measured = measure_in_subprocess(DECODE_SCRIPT, str(path))
    assert measured["shape"] == [side, side, 3] and measured["top"] == 255
    output_mb = side * side * 3 / 2**20  # 57 MB: the answer itself
    # PIL's own decoded image (2 or 4 bytes per pixel) plus the output, plus blocks; it was +540 MB.
    assert measured["peak_mb"] < output_mb + 110, measured


# --------------------------------------------------------------------------- item 6: pixels in flight


class HoldingEngine:
    """SAM engine stand-in: embedding takes HOLD_S (so decoded images queue up behind it); the
    mask is the prompt's box."""

    name = "reliability-holding"
    hold_s = 0.15

    def embed(self, image: np.ndarray) -> tuple[int, int]:
        time.sleep(self.hold_s)
        return image.shape[:2]

    def predict(self, embedding, box=None, points=None, point_labels=None):
        mask = np.zeros(embedding, bool)
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        mask[y0:y1, x0:x1] = True
        return mask, 0.9


HOLDING_ENGINE = f"{THIS_MODULE}:HoldingEngine"


class LiveDecodes:
    """Counts the pixels of decoded images still alive (wraps backends.images.fetcher.decode_image)."""

    def __init__(self, decode):
        self._decode = decode
        self._lock = threading.Lock()
        self.live = 0
        self.peak = 0

    def __call__(self, *args, **kwargs):
        pixels = self._decode(*args, **kwargs)
        count = pixels.shape[0] * pixels.shape[1]
        with self._lock:
            self.live += count
            self.peak = max(self.peak, self.live)
        weakref.finalize(pixels, self._gone, count)
        return pixels

    def _gone(self, count: int) -> None:
        with self._lock:
            self.live -= count


def megapixel_pngs(count: int, side: int = 1000) -> dict[str, bytes]:
    pixels = np.zeros((side, side, 3), np.uint8)
    pixels[::10] = 200
    data = encode(Image.fromarray(pixels))
    return {f"/big-{index}.png": data for index in range(count)}


def post_concurrently(client, urls: list[str]) -> list:
    answers: list = [None] * len(urls)

    def one(index: int) -> None:
        answers[index] = interactive(client, urls[index], task_id=100 + index)

    threads = [threading.Thread(target=one, args=(index,)) for index in range(len(urls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


def test_decoded_pixels_held_at_once_stay_within_the_decode_budget(tmp_path, monkeypatch):
    """8 annotators open 8 different 1 MP images while the engine is busy: at most the budget's
    worth of decoded images waits for it (it was all 8: memory grew with the number of requests)."""
    live = LiveDecodes(backends.images.fetcher.decode_image)
    monkeypatch.setattr(backends.images.fetcher, "decode_image", live)
    with HttpHost(megapixel_pngs(8)) as host:
        settings = settings_for(
            tmp_path,
            {"DECODE_MAX_INFLIGHT_MEGAPIXELS": "2", "DECODE_WAIT_TIMEOUT": "30"},
            sam_engine=HOLDING_ENGINE,
            image_allowed_hosts=(host.netloc,),
        )
        with sam_client(settings) as client:
            answers = post_concurrently(client, [f"{host.url}/big-{index}.png" for index in range(8)])
            assert all(answer is not None and answer.status_code == 200 for answer in answers), [
                describe(answer) for answer in answers if answer is not None and answer.status_code != 200
            ]
    # One image's worth of slack: a finished request frees its pixels just after its reservation.
    assert live.peak <= 3_000_000, f"{live.peak / 1e6:.1f} MP decoded at once"


def test_a_decode_that_cannot_get_memory_in_time_is_answered_503_and_the_server_serves_on(tmp_path):
    with HttpHost(megapixel_pngs(2)) as host:
        settings = settings_for(
            tmp_path,
            {"DECODE_MAX_INFLIGHT_MEGAPIXELS": "1", "DECODE_WAIT_TIMEOUT": "0.2"},
            sam_engine=HOLDING_ENGINE,
            image_allowed_hosts=(host.netloc,),
        )
        HoldingEngine.hold_s = 1.0
        try:
            with sam_client(settings) as client:
                answers = post_concurrently(client, [f"{host.url}/big-0.png", f"{host.url}/big-1.png"])
                statuses = sorted(answer.status_code for answer in answers)
                assert statuses == [200, 503], [describe(answer) for answer in answers]
                refused = next(answer for answer in answers if answer.status_code == 503)
                assert "DECODE_MAX_INFLIGHT_MEGAPIXELS" in refused.json()["error"]
                check_healthy(client.get)
                again = interactive(client, f"{host.url}/big-1.png", task_id=7)  # the budget is free again
                assert again.status_code == 200, describe(again)
        finally:
            HoldingEngine.hold_s = 0.15


# --------------------------------------------------------------------------- item 6: segmentation


SEGMENT_SCRIPT = """
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from segmentation.tiled_inference import segment_images
side = int(sys.argv[1])
torch.manual_seed(0)
# Any network mapping Bx3xHxW to BxCxHxW will do; a tiny one keeps the figure about the image.
network = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1)).eval()
image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
with torch.inference_mode():
    network(torch.zeros(4, 3, 512, 512))  # the activations of one batch of tiles, before measuring
before = peak_mb()
started = time.perf_counter()
(result,) = segment_images(network, [image], torch.device("cpu"))
print(json.dumps({"peak_mb": peak_mb() - before, "s": time.perf_counter() - started,
                  "shape": list(result.mask.shape)}))
"""


def test_segmenting_a_9_megapixel_image_holds_a_band_of_logits_not_the_whole_image():
    side = 3000
    measured = measure_in_subprocess(SEGMENT_SCRIPT, str(side))
    assert measured["shape"] == [side, side]
    # Mask (1 B/px) and confidence (2 B/px) are the answer, 26 MB here; it was +405 MB.
    assert measured["peak_mb"] < 150, measured


def speckled_segmentation(height: int, width: int):
    """A Segmentation whose "Nucleus" mask is noise (hundreds of thousands of runs) and whose
    "Cell" mask is one solid block."""
    from segmentation.tiled_inference import Segmentation

    mask = (np.random.default_rng(0).random((height, width)) < 0.5).astype(np.uint8)
    mask[: height // 4, : width // 4] = 2
    confidence = np.full((height, width), 0.9, np.float16)
    return Segmentation(mask, confidence, {1: 0.9, 2: 0.9}, 0.9)


def test_a_fragmented_prediction_is_left_out_of_the_answer_with_a_note(tmp_path, constant_model, monkeypatch):
    import segmentation.model

    height, width = 1000, 1000
    monkeypatch.setattr(
        segmentation.model,
        "segment_images",
        lambda network, images, device, **kwargs: [speckled_segmentation(height, width)],
    )
    with HttpHost({"/scan.png": encode(Image.new("RGB", (width, height)))}) as host:
        settings = settings_for(
            tmp_path,
            # post-processing off: filling the noise's holes would make it less fragmented; the cap is tested
            {"SEG_MAX_RLE_MB": "0.5", "SEG_FILL_HOLES_PX": "0", "SEG_MIN_COMPONENT_PX": "0"},
            seg_checkpoint=str(constant_model),
            image_allowed_hosts=(host.netloc,),
        )
        with segmentation_client(settings) as client:
            response = client.post("/predict", json=payloads.predict_body([payloads.task(1, f"{host.url}/scan.png")]))
    assert response.status_code == 200, describe(response)
    # The noise mask's RLE alone was ~0.9 MB (a 4 MB JSON answer; a 16 MP image: 38 MB).
    assert len(response.content) < 200_000, f"a {len(response.content) / 1e6:.1f} MB answer"
    (prediction,) = response.json()["results"]
    labels = [region["value"]["brushlabels"] for region in prediction["result"]]
    assert labels == [["Cell"]]
    assert "'Nucleus'" in prediction["error"] and "SEG_MAX_RLE_MB" in prediction["error"]


# --------------------------------------------------------------------------- item 6: training data


TRAINING_CONFIG = payloads.LABEL_CONFIG
TASKS = 24
TASK_SIDE = 600


def training_label_studio() -> FakeLabelStudio:
    """Project 1's export: TASKS tasks, each a TASK_SIDE square image with a brush annotation."""
    pixels = np.zeros((TASK_SIDE, TASK_SIDE, 3), np.uint8)
    pixels[100:300, 100:300] = 220
    image = Reply(200, encode(Image.fromarray(pixels)), PNG)
    truth = np.zeros((TASK_SIDE, TASK_SIDE), bool)
    truth[100:300, 100:300] = True
    fake = FakeLabelStudio()
    fake.projects[1] = TRAINING_CONFIG
    fake.exports[1] = []
    for task_id in range(1, TASKS + 1):
        fake.files[f"/data/upload/1/{task_id}.png"] = image
        annotation = payloads.annotation(task_id, [payloads.brush(truth, region_id="r1")], "2026-01-01T00:00:00Z")
        fake.exports[1].append(payloads.task(task_id, f"/data/upload/1/{task_id}.png", annotations=[annotation]))
    return fake


def test_training_keeps_decoded_images_on_disk_not_in_memory(tmp_path, monkeypatch):
    """What the training run holds in memory once its samples are made: it was every decoded image
    (TASKS x 1.4 MB here; 300 tasks of 1 MP: +3 GB)."""
    import segmentation.training_run

    held: dict = {}

    def probe(samples, labels, out_dir, config=None, **kwargs):
        held["bytes"] = tracemalloc.get_traced_memory()[0] - held["before"]
        held["samples"] = len(samples)
        held["dirs"] = [path.name for path in Path(out_dir).iterdir()] if Path(out_dir).is_dir() else []
        raise ValueError("probe: measured, not trained")

    monkeypatch.setattr(segmentation.training_run, "train", probe)
    fake = training_label_studio()
    region = fake.exports[1][0]["annotations"][0]["result"][0]
    decode_rle(region["value"]["rle"], TASK_SIDE, TASK_SIDE)  # its lookup table (4 MB, cached once) is not a sample
    with fake as label_studio:
        settings = settings_for(tmp_path, label_studio_url=label_studio.url, label_studio_api_key=fake.legacy_token)
        with segmentation_client(settings) as client:
            tracemalloc.start()
            try:
                held["before"] = tracemalloc.get_traced_memory()[0]
                response = client.post(
                    "/webhook", json={"action": "START_TRAINING", "project": {"id": 1, "label_config": TRAINING_CONFIG}}
                )
                assert response.status_code in (200, 201), describe(response)
                deadline = time.monotonic() + 60
                while "bytes" not in held and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                tracemalloc.stop()
            state = {}
            while time.monotonic() < deadline and state.get("state") != "failed":
                state = client.get("/health").json()["projects"].get("1", {})
                time.sleep(0.05)
    assert held.get("samples") == TASKS, held
    decoded_mb = TASKS * TASK_SIDE * TASK_SIDE * 4 / 2**20
    assert held["bytes"] < 0.1 * decoded_mb * 2**20, (
        f"{held['bytes'] / 2**20:.1f} MB held of {decoded_mb:.0f} MB decoded"
    )
    assert state.get("state") == "failed" and "probe" in state.get("error", "")
    # The run's decoded samples lived under the project's folder and are gone with the run.
    assert any(name.startswith(".training-samples-") for name in held["dirs"])
    assert not list((tmp_path / "models" / "project-1").glob(".training-samples-*"))


def test_stored_training_samples_give_exactly_the_crops_and_scores_of_samples_in_memory(tmp_path):
    from segmentation.augment import build_augmentation
    from segmentation.data import CropDataset, Sample, SampleStore
    from segmentation.network import NetworkConfig, build_network
    from segmentation.trainer import evaluate

    rng = np.random.default_rng(0)
    samples = []
    for index, (height, width) in enumerate([(90, 120), (40, 50), (130, 70)]):
        mask = np.zeros((height, width), np.uint8)
        mask[10:30, 5:25] = 1
        mask[height // 2 :, width // 2 :] = 2 if index else 0
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        samples.append(Sample(f"s{index}", image, mask))
    store = SampleStore(tmp_path / "samples")
    stored = [store.add(sample.name, sample.image, sample.mask) for sample in samples]
    in_memory = CropDataset(samples, crop_size=64, length=24, augment=build_augmentation(seed=1), seed=3)
    on_disk = CropDataset(stored, crop_size=64, length=24, augment=build_augmentation(seed=1), seed=3)
    for index in range(24):
        (image_a, mask_a), (image_b, mask_b) = in_memory[index], on_disk[index]
        assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b), f"crop {index} differs"
    torch.manual_seed(0)
    network = build_network(NetworkConfig(n_classes=3, channels=(4, 8), num_res_units=0))
    device = torch.device("cpu")
    assert evaluate(network, samples, 3, device) == evaluate(network, stored, 3, device)


def test_tiled_inference_places_and_weights_windows_exactly_as_monai_does():
    """The band-by-band inference re-states monai's window placement and Gaussian weights (so it
    need not import monai); they must stay equal, or predictions would drift from the old ones."""
    from monai.data.utils import compute_importance_map, dense_patch_slices

    from segmentation.tiled_inference import gaussian_importance, window_starts

    for size in [(1000, 900), (512, 512), (513, 4000), (96, 128), (3000, 777), (17, 33)]:
        roi = (min(512, -(-size[0] // 16) * 16), min(512, -(-size[1] // 16) * 16))
        padded = (max(size[0], roi[0]), max(size[1], roi[1]))
        interval = tuple(r if r == s else max(int(r * 0.75), 1) for r, s in zip(roi, padded, strict=True))
        expected = [(int(rows.start), int(cols.start)) for rows, cols in dense_patch_slices(padded, roi, interval)]
        ours = [
            (top, left)
            for top in window_starts(padded[0], roi[0], 0.25)
            for left in window_starts(padded[1], roi[1], 0.25)
        ]
        assert ours == expected, size
        weights = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device="cpu", dtype=torch.float32)
        assert torch.equal(gaussian_importance(roi, torch.device("cpu")), weights), roi
