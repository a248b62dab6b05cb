"""sdk_scripts.export_masks and mask_dataset: annotation choice, storage objects, mask files, Dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backends.label_studio.annotations import newest_annotation
from sdk_scripts.common import DEFAULT_LABEL_CONFIG, UserError
from sdk_scripts.export_masks import (
    export_project,
    image_data_key,
    label_map_from_config,
    overlay,
    select_exports,
    tasks_from_storage_objects,
)
from sdk_scripts.mask_dataset import MaskDataset
from tests.support.fetcher import FakeImageFetcher
from tests.support.payloads import brush

CONFIG = DEFAULT_LABEL_CONFIG.read_text()
H, W = 24, 32


def polygon(points_px: list[tuple[float, float]], label: str) -> dict:
    points = [[100.0 * x / W, 100.0 * y / H] for x, y in points_px]
    return {
        "type": "polygonlabels",
        "from_name": "polygon",
        "to_name": "image",
        "original_width": W,
        "original_height": H,
        "value": {"points": points, "polygonlabels": [label], "closed": True},
    }


def rng_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def test_label_map_and_data_key_come_from_the_default_config():
    assert label_map_from_config(CONFIG) == {"Nucleus": 1, "Cell": 2}
    assert image_data_key(CONFIG) == "image"
    with pytest.raises(UserError, match="no BrushLabels or PolygonLabels"):
        label_map_from_config(
            '<View><Image name="i" value="$img"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>'
        )


def test_default_config_has_every_tool_with_the_same_labels_and_metadata_headers():
    from backends.label_studio.label_config import parse_label_config

    config = parse_label_config(CONFIG)
    by_type = {tag.type: tag for tag in config.controls}
    # one Labels tag shared by every tool (see tests/unit/test_labels_tag_config.py)
    assert set(by_type) >= {"Labels", "Brush", "Rectangle", "KeyPoint", "Polygon"}
    assert all(tag.labels == ("Nucleus", "Cell") for tag in by_type.values())
    assert by_type["Rectangle"].smart and by_type["KeyPoint"].smart
    assert by_type["Brush"].name == "tag" and config.images == {"image": "image"}
    for key in ("$sample", "$stain", "$dataset"):
        assert key in CONFIG
    assert 'zoom="true"' in CONFIG


def test_newest_annotation_ignores_cancelled_ones():
    annotations = [
        {"id": 1, "result": [], "updated_at": "2026-01-01T10:00:00Z"},
        {"id": 2, "result": [], "updated_at": "2026-01-03T10:00:00Z", "was_cancelled": True},
        {"id": 3, "result": [], "updated_at": "2026-01-02T10:00:00Z"},
        {"id": 4, "result": None, "updated_at": "2026-01-04T10:00:00Z"},
    ]
    assert newest_annotation(annotations)["id"] == 3
    assert newest_annotation([{"id": 9, "was_cancelled": True, "result": []}]) is None
    assert newest_annotation([]) is None


def test_storage_objects_in_both_formats_become_tasks():
    per_annotation = [
        {"id": 11, "result": [{"a": 1}], "task": {"id": 5, "data": {"image": "gs://b/x.png"}}},
        {"id": 12, "result": [], "task": {"id": 5, "data": {"image": "gs://b/x.png"}}},
        {"id": 11, "result": [{"a": 1}], "task": {"id": 5, "data": {"image": "gs://b/x.png"}}},
    ]
    per_task = [{"id": 6, "data": {"image": "gs://b/y.png"}, "annotations": [{"id": 13, "result": []}]}]
    tasks = tasks_from_storage_objects(per_annotation + per_task + [{"unrelated": True}, "junk"])
    assert [t["id"] for t in tasks] == [5, 6]
    assert [a["id"] for a in tasks[0]["annotations"]] == [11, 12]
    assert "task" not in tasks[0]["annotations"][0]
    assert tasks[1]["data"] == {"image": "gs://b/y.png"}


def test_select_exports_sanitises_and_deduplicates_names():
    tasks = [
        {"id": 2, "data": {"image": "gs://b/../../etc/passwd.png"}, "annotations": [{"id": 1, "result": []}]},
        {"id": 3, "data": {"image": "gs://b/one/cell.png"}, "annotations": [{"id": 2, "result": []}]},
        {"id": 4, "data": {"image": "gs://b/two/cell.png"}, "annotations": [{"id": 3, "result": []}]},
        {"id": 5, "data": {"image": "gs://b/none.png"}, "annotations": []},
        {"id": 6, "data": {}, "annotations": [{"id": 4, "result": []}]},
    ]
    items, skipped = select_exports(tasks, "image")
    assert [(i.task_id, i.stem) for i in items] == [(2, "passwd"), (3, "cell-3"), (4, "cell-4")]
    assert len(skipped) == 2 and "task 5" in skipped[0] and "task 6" in skipped[1]


def test_overlay_paints_labelled_pixels_only():
    image = np.full((4, 4, 3), 100, np.uint8)
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0], mask[1, 1] = 1, 2
    out = overlay(image, mask)
    assert (out[2:, 2:] == 100).all()
    assert not (out[0, 0] == 100).all() and not (out[0, 0] == out[1, 1]).all()


def test_export_project_writes_images_masks_overlays_and_label_map(tmp_path):
    nucleus = np.zeros((H, W), bool)
    nucleus[4:10, 4:12] = True
    cell = np.zeros((H, W), bool)
    cell[2:14, 2:20] = True
    # A non-convex polygon (a "U"): rows 16..22, the notch between x 10 and 20 must stay empty.
    u_shape = [(4, 16), (26, 16), (26, 22), (20, 22), (20, 18), (10, 18), (10, 22), (4, 22)]
    results = [brush(cell, "Cell"), brush(nucleus, "Nucleus"), polygon(u_shape, "Cell")]
    images = {"gs://b/p/img one.png": rng_image(1), "gs://b/p/img2.png": rng_image(2)}
    tasks = [
        {
            "id": 7,
            "data": {"image": "gs://b/p/img one.png"},
            "annotations": [
                {"id": 1, "result": results, "updated_at": "2026-01-02"},
                {"id": 2, "result": [brush(cell, "Cell")], "updated_at": "2026-01-01"},
            ],
        },
        {"id": 8, "data": {"image": "gs://b/p/img2.png"}, "annotations": [{"id": 3, "result": [], "updated_at": "x"}]},
        {"id": 9, "data": {"image": "gs://b/p/missing.png"}, "annotations": [{"id": 4, "result": []}]},
    ]
    fetcher = FakeImageFetcher(images)
    summary = export_project(tasks, CONFIG, tmp_path, "later", fetcher, progress=False)
    assert summary.exported == ["img_one", "img2"] and len(summary.failed) == 1 and "task 9" in summary.failed[0]
    assert ("gs://b/p/img one.png", 7) in fetcher.calls
    assert json.loads((tmp_path / "label_map.json").read_text()) == {"Nucleus": 1, "Cell": 2}

    mask = np.array(Image.open(tmp_path / "masks" / "img_one.png"))
    expected = np.zeros((H, W), np.uint8)
    expected[cell] = 2
    expected[nucleus] = 1  # drawn after the cell: "later" puts it on top
    expected[16:22, 4:26] = 2
    expected[18:22, 10:20] = 0  # the notch of the U
    assert mask.dtype == np.uint8 and mask.shape == (H, W)
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(
        np.array(Image.open(tmp_path / "images" / "img_one.png")), images["gs://b/p/img one.png"]
    )
    assert np.array(Image.open(tmp_path / "overlays" / "img_one.png")).shape == (H, W, 3)
    assert not np.array(Image.open(tmp_path / "masks" / "img2.png")).any()  # an empty annotation: background
    index = json.loads((tmp_path / "tasks.json").read_text())
    assert [(row["stem"], row["task_id"], row["annotation_id"]) for row in index] == [("img_one", 7, 1), ("img2", 8, 3)]
    assert not list(tmp_path.rglob("*.partial"))


def test_overlap_rules_decide_who_wins(tmp_path):
    big = np.zeros((H, W), bool)
    big[0:20, 0:20] = True
    small = np.zeros((H, W), bool)
    small[5:10, 5:10] = True
    tasks = [
        {
            "id": 1,
            "data": {"image": "gs://b/a.png"},
            "annotations": [{"id": 1, "result": [brush(small, "Nucleus"), brush(big, "Cell")]}],
        }
    ]
    fetcher = FakeImageFetcher({"gs://b/a.png": rng_image(0)})
    seen = {}
    for rule in ("later", "earlier", "smaller"):
        export_project(tasks, CONFIG, tmp_path / rule, rule, fetcher, progress=False)
        seen[rule] = int(np.array(Image.open(tmp_path / rule / "masks" / "a.png"))[7, 7])
    assert seen == {"later": 2, "earlier": 1, "smaller": 1}


def test_masks_only_export_takes_the_size_from_the_regions(tmp_path):
    region = np.zeros((H, W), bool)
    region[1:3, 1:3] = True
    tasks = [
        {
            "id": 1,
            "data": {"image": "/data/upload/1/a.png"},
            "annotations": [{"id": 1, "result": [brush(region, "Cell")]}],
        }
    ]
    summary = export_project(tasks, CONFIG, tmp_path, "later", None, with_images=False, progress=False)
    assert summary.exported == ["a"]
    assert (np.array(Image.open(tmp_path / "masks" / "a.png")) == region * 2).all()
    assert not (tmp_path / "images").exists()


def test_mask_dataset_loads_pairs_and_label_map(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = rng_image(3)
    mask = np.zeros((H, W), np.uint8)
    mask[2:5, 2:6] = 2
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    Image.fromarray(image).save(tmp_path / "images" / "unlabelled.png")
    (tmp_path / "label_map.json").write_text(json.dumps({"Nucleus": 1, "Cell": 2}))
    dataset = MaskDataset(tmp_path)
    assert len(dataset) == 1 and dataset.unpaired == ["unlabelled"]
    assert dataset.labels == ("Nucleus", "Cell") and dataset.num_classes == 3
    x, y = dataset[0]
    assert x.shape == (3, H, W) and x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.allclose(x[:, 0, 0], torch.tensor(image[0, 0] / 255.0, dtype=torch.float32))
    assert y.shape == (H, W) and y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(mask).long())

    flipped = MaskDataset(tmp_path, transform=lambda image, mask: {"image": image[:, ::-1], "mask": mask[:, ::-1]})
    _, y_flipped = flipped[0]
    assert torch.equal(y_flipped, torch.from_numpy(mask[:, ::-1].copy()).long())
    with pytest.raises(FileNotFoundError):
        MaskDataset(Path(tmp_path) / "nowhere")
