"""GCS-backed project end to end, with real processes: fake-gcs-server + Label Studio + the SDK scripts.

Images and a metadata manifest go to a source bucket; setup_project connects it (twice: the second
run changes nothing); import_gcs creates tasks carrying the metadata (a second run adds nothing);
annotations (brush masks from real ground truth, and a non-convex polygon) are submitted; the
target bucket receives them; export_masks, from the API and from the bucket, reproduces exactly
what was submitted (IoU 1.0 per class).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdk_scripts import export_masks, import_gcs, setup_project
from sdk_scripts.mask_dataset import MaskDataset
from tests.support.masks import iou
from tests.support.payloads import brush

pytestmark = pytest.mark.e2e

IMAGES = 3  # real DSB2018 images; the smallest ones keep the run short


def storage_client(gcs_emulator):
    client = getattr(gcs_emulator, "client", None)
    return client() if callable(client) else client


def pick_images(shared_data: Path, count: int) -> list[Path]:
    """The `count` smallest DSB2018 images (by pixel count), name order as tie-break."""
    paths = sorted((shared_data / "dsb2018" / "images").glob("*.png"))
    sized = []
    for path in paths[:60]:
        with Image.open(path) as image:
            sized.append((image.width * image.height, path.name, path))
    return [path for _, _, path in sorted(sized)[:count]]


def nuclei_mask(shared_data: Path, image_path: Path) -> np.ndarray:
    """HxW bool: every nucleus of the instance label image."""
    return np.array(Image.open(shared_data / "dsb2018" / "labels" / image_path.name)) > 0


def u_polygon(height: int, width: int) -> tuple[dict, np.ndarray]:
    """A non-convex "U" polygon region (vertices on pixel corners, in percent) and its HxW bool mask."""
    top, bottom = height // 4, height // 2
    left, right = width // 4, 3 * width // 4
    notch_left, notch_right, notch_bottom = (
        left + (right - left) // 3,
        right - (right - left) // 3,
        top + (bottom - top) // 2,
    )
    corners = [
        (left, top),
        (notch_left, top),
        (notch_left, notch_bottom),
        (notch_right, notch_bottom),
        (notch_right, top),
        (right, top),
        (right, bottom),
        (left, bottom),
    ]
    region = {
        "id": "poly1",
        "type": "polygonlabels",
        "from_name": "polygon",
        "to_name": "image",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "points": [[100.0 * x / width, 100.0 * y / height] for x, y in corners],
            "polygonlabels": ["Cell"],
            "closed": True,
        },
    }
    mask = np.zeros((height, width), bool)
    mask[top:bottom, left:right] = True
    mask[top:notch_bottom, notch_left:notch_right] = False
    return region, mask


def test_gcs_project_flow(label_studio, gcs_emulator, shared_data, tmp_path, monkeypatch, capsys):
    run_id = uuid.uuid4().hex[:8]
    source_bucket, target_bucket = f"src-{run_id}", f"dst-{run_id}"
    title = f"GCS flow {run_id}"
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)

    # --- source bucket: images, a JSON-lines manifest (one row for an image that is not there)
    # and a sidecar for the image the manifest misses
    client = storage_client(gcs_emulator)
    client.create_bucket(source_bucket)
    client.create_bucket(target_bucket)
    images = pick_images(shared_data, IMAGES)
    for path in images:
        client.bucket(source_bucket).blob(f"images/{path.name}").upload_from_filename(str(path))
    metadata = {path.name: {"sample": f"S{i}", "stain": "DAPI", "dataset": "dsb2018"} for i, path in enumerate(images)}
    manifest_rows = [{"image": name, **meta} for name, meta in list(metadata.items())[:-1]]
    manifest_rows.append({"image": "not-uploaded.png", "sample": "S9"})
    client.bucket(source_bucket).blob("manifest.jsonl").upload_from_string(
        "\n".join(json.dumps(row) for row in manifest_rows) + "\n"
    )
    last = images[-1].name
    client.bucket(source_bucket).blob(f"images/{Path(last).stem}.json").upload_from_string(json.dumps(metadata[last]))

    # --- setup_project, twice
    setup_args = [
        "--title",
        title,
        "--source",
        f"gs://{source_bucket}/images",
        "--target",
        f"gs://{target_bucket}/annotations",
        "--skip-backends",
        "--no-progress",
    ]
    assert setup_project.main(setup_args) == 0
    first = capsys.readouterr().out
    assert first.count("created") == 3, first
    assert setup_project.main(setup_args) == 0
    second = capsys.readouterr().out
    assert second.count("unchanged") == 3 and "created" not in second and "updated" not in second, second
    project_id = int(second.strip().splitlines()[-1].split()[1].rstrip(":"))
    ls = label_studio.ls
    assert len(ls.import_storage.gcs.list(project=project_id)) == 1
    assert len(ls.export_storage.gcs.list(project=project_id)) == 1
    assert label_studio.token not in first + second

    # --- import_gcs: dry run, import, import again
    import_args = [
        "--project",
        title,
        "--source",
        f"gs://{source_bucket}/images",
        "--manifest",
        f"gs://{source_bucket}/manifest.jsonl",
        "--no-progress",
    ]
    assert import_gcs.main(import_args + ["--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert f"would import:            {IMAGES}" in dry
    assert list(ls.tasks.list(project=project_id)) == []
    assert import_gcs.main(import_args) == 0
    report = capsys.readouterr().out
    assert f"imported:                {IMAGES}" in report
    assert "images without metadata: 0" in report
    assert "metadata without images: 1: not-uploaded.png" in report
    tasks = {t.data["image"]: t for t in ls.tasks.list(project=project_id, resolve_uri=False)}
    assert set(tasks) == {f"gs://{source_bucket}/images/{p.name}" for p in images}
    for path in images:
        data = tasks[f"gs://{source_bucket}/images/{path.name}"].data
        assert {k: data[k] for k in ("sample", "stain", "dataset")} == metadata[path.name]
    assert import_gcs.main(import_args) == 0
    again = capsys.readouterr().out
    assert "imported:                0" in again and f"already in the project:  {IMAGES}" in again
    assert len(list(ls.tasks.list(project=project_id))) == IMAGES

    # --- annotations: brush from the true nuclei; a polygon drawn last on the first image;
    # the third task only has a cancelled (skipped) annotation
    expected: dict[str, np.ndarray] = {}
    submitted = []
    for index, path in enumerate(images):
        task = tasks[f"gs://{source_bucket}/images/{path.name}"]
        nuclei = nuclei_mask(shared_data, path)
        results = [brush(nuclei, "Nucleus", f"nuc{index}")]
        mask = nuclei.astype(np.uint8)
        if index == 0:
            region, polygon_mask = u_polygon(*nuclei.shape)
            results.append(region)
            mask[polygon_mask] = 2  # "later" overlap rule: the polygon is on top
        if index == IMAGES - 1:
            ls.annotations.create(id=task.id, result=[], was_cancelled=True)
            continue
        # an older annotation of the same task must lose to the newer one
        ls.annotations.create(id=task.id, result=[brush(~nuclei, "Cell", "old")])
        submitted.append(ls.annotations.create(id=task.id, result=results).id)
        expected[path.stem] = mask

    # --- the target bucket receives every annotation, as Label Studio writes it on submit
    objects = {
        blob.name: json.loads(blob.download_as_bytes())
        for blob in client.list_blobs(target_bucket, prefix="annotations/")
    }
    stored_ids = {doc.get("id") for doc in objects.values()}
    assert set(submitted) <= stored_ids, (submitted, sorted(objects))

    # --- export_masks from the API and from the bucket reproduce the submitted masks exactly
    for source, extra in (("api", []), ("bucket", ["--from-bucket", f"gs://{target_bucket}/annotations"])):
        out = tmp_path / source
        assert export_masks.main(["--project", str(project_id), "--out", str(out), "--no-progress", *extra]) == 0
        printed = capsys.readouterr().out
        assert f"exported {len(expected)} task(s)" in printed, printed
        assert json.loads((out / "label_map.json").read_text()) == {"Nucleus": 1, "Cell": 2}
        assert sorted(p.stem for p in (out / "masks").glob("*.png")) == sorted(expected)
        for stem, want in expected.items():
            got = np.array(Image.open(out / "masks" / f"{stem}.png"))
            assert got.dtype == np.uint8 and got.shape == want.shape
            for k in (1, 2):
                assert iou(got == k, want == k) == 1.0, (source, stem, k)
            np.testing.assert_array_equal(got, want)
            original = np.array(Image.open(shared_data / "dsb2018" / "images" / f"{stem}.png").convert("RGB"))
            np.testing.assert_array_equal(np.array(Image.open(out / "images" / f"{stem}.png")), original)
            assert (out / "overlays" / f"{stem}.png").is_file()
        dataset = MaskDataset(out)
        assert len(dataset) == len(expected) and dataset.labels == ("Nucleus", "Cell")
        image, mask = dataset[0]
        assert image.shape[0] == 3 and mask.shape == image.shape[1:]


def test_setup_project_connects_both_backends_once(label_studio, gcs_emulator, start_backend, monkeypatch, capsys):
    run_id = uuid.uuid4().hex[:8]
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    segmentation = start_backend("segmentation")
    sam = start_backend("sam")
    args = ["--title", f"Backends {run_id}", "--seg-url", segmentation.url, "--sam-url", sam.url, "--no-progress"]
    assert setup_project.main(args) == 0
    first = capsys.readouterr().out
    assert first.count("ml backend") == 2 and first.count("created") == 3, first
    assert setup_project.main(args) == 0
    second = capsys.readouterr().out
    assert second.count("unchanged") == 3 and "created" not in second, second
    project_id = int(second.strip().splitlines()[-1].split()[1].rstrip(":"))
    backends = {b.url.rstrip("/"): b for b in label_studio.ls.ml.list(project=project_id)}
    assert set(backends) == {segmentation.url, sam.url}
    assert backends[sam.url].is_interactive and not backends[segmentation.url].is_interactive

    # a backend that is down: one line, exit status 2, a hint to start it or skip it
    sam.stop()
    args[args.index(sam.url)] = sam.url + "/other"
    assert setup_project.main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "--skip-backends" in error and len(error.splitlines()) == 1
