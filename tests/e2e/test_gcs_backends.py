"""Both backends read `gs://` images through Label Studio, in a project made by the SDK scripts.

Real processes on loopback: fake-gcs-server, Label Studio 1.23 and both backends. Real DSB2018
fluorescence images and a JSON-lines manifest go to a source bucket; setup_project connects the
source and target buckets and both backends; import_gcs creates tasks `{"image": "gs://...", ...}`.
The backends are started WITHOUT any GCS configuration (no STORAGE_EMULATOR_HOST, no
GOOGLE_APPLICATION_CREDENTIALS): the only way to the pixels is Label Studio's
`/tasks/{id}/resolve/?fileuri=...`, which proxies the private bucket.

- SAM (classic engine): a smart rectangle around a true nucleus, sent through Label Studio's
  interactive-annotating endpoint, comes back as a brush mask close to that nucleus.
- Segmentation: a U-Net trained offline (`python -m segmentation.train`) on other images into the
  backend's MODEL_DIR is served to this project (which has no model of its own); "Retrieve
  predictions" stores non-empty brush predictions of that version in Label Studio.
- Neither backend's log contains the API token.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from backends.masks.rle import decode_rle
from sdk_scripts import import_gcs, setup_project
from tests.e2e.dsb2018 import SIDE, instance_labels, largest_inner_instances, pick_images, true_mask
from tests.support.masks import iou
from tests.support.payloads import rectangle_around, with_shared_labels

pytestmark = pytest.mark.e2e

N_TRAIN = 8  # offline training images (never uploaded)
N_TASKS = 3  # images in the bucket, i.e. gs:// tasks (never trained on)
TRAIN_MINUTES = 0.5
N_PROMPTS = 3  # smart rectangles, one per nucleus, on the first gs:// task
MIN_PROMPT_IOU = 0.6
MIN_PREDICTION_IOU = 0.4  # an empty mask scores 0; a 30 s model on this CPU scores ~0.6
GCS_VARIABLES = ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GCS_DIRECT_READ")
# High so that no webhook makes the segmentation backend train: the offline model is what is served.
SEGMENTATION_ENV = {"DEVICE": "cpu", "TRAIN_EVERY": "1000"}


# --------------------------------------------------------------------- data
def brush_mask(regions: list[dict], label: str = "Nucleus") -> np.ndarray:
    """The one brush region with `label` among `regions` (label_config.xml's shape: a `brush` result
    from `tag` and a `labels` result from `label` with the same id), decoded to HxW bool."""
    labelled = [r for r in regions if r["type"] == "labels" and r["value"]["labels"] == [label] and "rle" in r["value"]]
    assert len(labelled) == 1, [(r["type"], r["from_name"]) for r in regions]
    (brush,) = [r for r in regions if r["type"] == "brush" and r["id"] == labelled[0]["id"]]
    assert (brush["from_name"], brush["to_name"], labelled[0]["from_name"]) == ("tag", "image", "label")
    assert brush["value"]["rle"] == labelled[0]["value"]["rle"]
    return decode_rle(brush["value"]["rle"], brush["original_height"], brush["original_width"])


def resolve_requests(label_studio, task_id: int, uri: str) -> int:
    """How many `GET /tasks/{task_id}/resolve/?fileuri=<urlsafe b64 of uri>` Label Studio answered
    with 200, from its request log (0 when the log is unavailable)."""
    if label_studio.log_path is None or not Path(label_studio.log_path).is_file():
        return 0
    fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
    request = f'"GET /tasks/{task_id}/resolve/?fileuri={fileuri} HTTP/1.1" 200 '
    return sum(request in line for line in Path(label_studio.log_path).read_text(errors="replace").splitlines())


def process_environment(pid: int) -> dict[str, str]:
    """The environment a running process was started with (Linux /proc)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode(errors="replace").split("\0") if "=" in entry)


# --------------------------------------------------------------------- fixtures
@dataclass
class OfflineModel:
    model_dir: Path
    version: str
    steps: int
    seconds: float


@dataclass
class GcsProject:
    id: int
    title: str
    task_of: dict[str, int]  # image file name -> task id
    uri_of: dict[int, str]  # task id -> gs:// URI
    images: list[Path]  # the uploaded images, task order
    sam: object  # devstack.backends.Backend
    segmentation: object
    sam_ml_id: int
    seconds: float


@pytest.fixture(scope="module")
def offline_model(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> OfflineModel:
    """A U-Net trained by the offline CLI on N_TRAIN images (foreground masks) into a fresh MODEL_DIR."""
    started = time.monotonic()
    root = tmp_path_factory.mktemp("offline-model")
    images_dir, masks_dir, model_dir = root / "images", root / "masks", root / "model-dir"
    images_dir.mkdir()
    masks_dir.mkdir()
    for path in pick_images(shared_data, N_TRAIN + N_TASKS)[:N_TRAIN]:
        (images_dir / path.name).symlink_to(path.resolve())
        Image.fromarray(true_mask(shared_data, path).astype(np.uint8)).save(masks_dir / path.name)
    command = [
        sys.executable,
        "-m",
        "segmentation.train",
        "--images",
        str(images_dir),
        "--masks",
        str(masks_dir),
        "--out",
        str(model_dir),
        "--minutes",
        str(TRAIN_MINUTES),
        "--labels",
        "Nucleus",
        "--device",
        "cpu",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["labels"] == ["Nucleus"], summary
    return OfflineModel(
        model_dir=model_dir, version=summary["version"], steps=summary["steps"], seconds=time.monotonic() - started
    )


@pytest.fixture(scope="module")
def gcs_project(label_studio, gcs_emulator, start_backend, shared_data, offline_model) -> GcsProject:
    """Source bucket with images + manifest; both backends started without GCS settings; a project
    made by setup_project (both buckets, both backends) and tasks made by import_gcs."""
    started = time.monotonic()
    run_id = uuid.uuid4().hex[:8]
    source_bucket, target_bucket = f"src-{run_id}", f"dst-{run_id}"
    title = f"GCS backends {run_id}"
    images = pick_images(shared_data, N_TRAIN + N_TASKS)[N_TRAIN:]

    client = gcs_emulator.client()
    client.create_bucket(source_bucket)
    client.create_bucket(target_bucket)
    for path in images:
        blob = client.bucket(source_bucket).blob(f"images/{path.name}")
        blob.upload_from_filename(str(path), content_type="image/png")
    manifest = [{"image": path.name, "sample": f"S{index}", "stain": "DAPI"} for index, path in enumerate(images)]
    client.bucket(source_bucket).blob("manifest.jsonl").upload_from_string(
        "\n".join(json.dumps(row) for row in manifest) + "\n"
    )

    with pytest.MonkeyPatch.context() as patch:
        # The backends inherit our environment: they must not get any way to GCS of their own.
        for name in GCS_VARIABLES:
            patch.delenv(name, raising=False)
        segmentation = start_backend(
            "segmentation", env={**SEGMENTATION_ENV, "MODEL_DIR": str(offline_model.model_dir)}
        )
        sam = start_backend("sam", env={"SAM_ENGINE": "classic"})
        # The scripts (this process) do talk to the emulator.
        patch.setenv("LABEL_STUDIO_URL", label_studio.url)
        patch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
        patch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert (
                setup_project.main(
                    [
                        "--title",
                        title,
                        "--source",
                        f"gs://{source_bucket}/images",
                        "--target",
                        f"gs://{target_bucket}/annotations",
                        "--seg-url",
                        segmentation.url,
                        "--sam-url",
                        sam.url,
                        "--no-progress",
                    ]
                )
                == 0
            )
            assert (
                import_gcs.main(
                    [
                        "--project",
                        title,
                        "--source",
                        f"gs://{source_bucket}/images",
                        "--manifest",
                        f"gs://{source_bucket}/manifest.jsonl",
                        "--no-progress",
                    ]
                )
                == 0
            )
    output = printed.getvalue()
    assert f"imported:                {N_TASKS}" in output, output
    assert label_studio.token not in output

    ls = label_studio.ls
    (project,) = [p for p in ls.projects.list() if p.title == title]
    tasks = list(ls.tasks.list(project=project.id, resolve_uri=False))
    task_of, uri_of = {}, {}
    for task in tasks:
        uri = task.data["image"]
        assert uri.startswith(f"gs://{source_bucket}/images/"), uri
        assert task.data["stain"] == "DAPI"  # metadata from the manifest
        task_of[uri.rsplit("/", 1)[1]] = task.id
        uri_of[task.id] = uri
    assert sorted(task_of) == sorted(path.name for path in images)
    backends = {m.url.rstrip("/"): m for m in ls.ml.list(project=project.id)}
    assert set(backends) == {sam.url, segmentation.url}, sorted(backends)
    return GcsProject(
        id=project.id,
        title=title,
        task_of=task_of,
        uri_of=uri_of,
        images=images,
        sam=sam,
        segmentation=segmentation,
        sam_ml_id=backends[sam.url].id,
        seconds=time.monotonic() - started,
    )


# --------------------------------------------------------------------- tests
def test_smart_rectangle_on_a_gs_task_returns_the_nucleus(label_studio, gcs_project, shared_data):
    image = gcs_project.images[0]
    task_id = gcs_project.task_of[image.name]
    instances = largest_inner_instances(instance_labels(shared_data, image), N_PROMPTS)
    assert len(instances) == N_PROMPTS
    ious, seconds = [], []
    for truth in instances:
        started = time.monotonic()
        response = label_studio.http.post(
            f"{label_studio.url}/api/ml/{gcs_project.sam_ml_id}/interactive-annotating",
            json={"task": task_id, "context": {"result": with_shared_labels(rectangle_around(truth))}},
            timeout=120,
        )
        seconds.append(time.monotonic() - started)
        assert response.status_code == 200, response.text[:500]
        body = response.json()
        assert "errors" not in body, f"{body['errors']}; SAM log: {gcs_project.sam.log_path}"
        mask = brush_mask(body["data"]["result"])
        assert mask.shape == truth.shape
        ious.append(iou(mask, truth))
    print(
        f"smart rectangles on gs:// task {task_id}: IoU {[round(v, 3) for v in ious]}, "
        f"seconds {[round(s, 2) for s in seconds]}"
    )
    assert min(ious) > MIN_PROMPT_IOU, ious
    assert "classic" in gcs_project.sam.health()["engine"]


def test_retrieve_predictions_on_gs_tasks_uses_the_offline_model(label_studio, gcs_project, offline_model, shared_data):
    health = gcs_project.segmentation.health()
    assert health["fallback_model"] == offline_model.version, health
    task_ids = [gcs_project.task_of[path.name] for path in gcs_project.images]
    resolved_before = [resolve_requests(label_studio, t, gcs_project.uri_of[t]) for t in task_ids]
    started = time.monotonic()
    response = label_studio.http.post(
        f"{label_studio.url}/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": gcs_project.id},
        json={"selectedItems": {"all": False, "included": task_ids}},
        timeout=300,
    )
    retrieved_s = time.monotonic() - started
    assert response.status_code == 200, response.text[:500]
    # The backend fetched each gs:// image through Label Studio's resolve endpoint just now.
    resolved_after = [resolve_requests(label_studio, t, gcs_project.uri_of[t]) for t in task_ids]
    assert all(after > before for before, after in zip(resolved_before, resolved_after, strict=True)), (
        resolved_before,
        resolved_after,
    )

    ious = []
    for path, task_id in zip(gcs_project.images, task_ids, strict=True):
        listed = label_studio.http.get(f"{label_studio.url}/api/predictions/", params={"task": task_id}, timeout=30)
        assert listed.status_code == 200, listed.text[:300]
        served = [p for p in listed.json() if p["model_version"] == offline_model.version]
        assert len(served) == 1, (
            task_id,
            [(p["model_version"], len(p["result"])) for p in listed.json()],
            f"segmentation log: {gcs_project.segmentation.log_path}",
        )
        prediction = served[0]
        assert 0.0 < prediction["score"] <= 1.0, prediction["score"]
        predicted = brush_mask(prediction["result"])
        assert predicted.shape == (SIDE, SIDE) and predicted.any()
        ious.append(iou(predicted, true_mask(shared_data, path)))
    print(
        f"predictions of {offline_model.version} (trained offline: {offline_model.steps} steps, "
        f"{offline_model.seconds:.0f} s) on gs:// tasks: IoU {[round(v, 3) for v in ious]}, "
        f"retrieved in {retrieved_s:.1f} s; project set up in {gcs_project.seconds:.0f} s"
    )
    assert min(ious) > MIN_PREDICTION_IOU, ious  # an empty mask scores 0
    assert gcs_project.segmentation.health()["projects"][str(gcs_project.id)]["model_version"] == offline_model.version


def test_backends_read_gs_images_without_gcs_credentials_or_leaking_the_token(label_studio, gcs_project):
    # Every gs:// image went through Label Studio's resolve endpoint (the bucket is private to it).
    assert label_studio.log_path is not None
    for task_id, uri in gcs_project.uri_of.items():
        assert resolve_requests(label_studio, task_id, uri) >= 1, (task_id, uri, label_studio.log_path)
    for backend in (gcs_project.sam, gcs_project.segmentation):
        environment = process_environment(backend.process.pid)
        assert environment.get("LABEL_STUDIO_URL") == label_studio.url  # the environment was read
        assert not set(GCS_VARIABLES) & set(environment), (backend.name, sorted(set(GCS_VARIABLES) & set(environment)))
        assert label_studio.token not in backend.log_path.read_text(errors="replace"), backend.log_path
        with requests.Session() as session:
            session.trust_env = False
            assert session.get(f"{backend.url}/health", timeout=5).status_code == 200
