"""Issue 8, items 3, 10 and 11a: polygon rasterisation bounded by the image, SDK scripts that report
bad items and go on, and a label config whose output tag names a non-Image refused with a 4xx.

Memory-hungry cases run in a child process with a data-size limit (RLIMIT_DATA), so that the
unbounded rasteriser fails the test with a MemoryError instead of taking gigabytes from the
machine; the child reports its peak Python-traced allocation (tracemalloc counts numpy buffers).
"""

from __future__ import annotations

import inspect
import json
import os
import shlex
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from tests.reliability.conftest import base_settings, segmentation_client
from tests.support import payloads
from tests.support.fetcher import FakeImageFetcher
from tests.support.http_host import HttpHost
from tests.support.images import png

CODE_ROOT = Path(__import__("backends").__file__).resolve().parents[1]  # the code under test (also /tmp/base)

CHILD_DATA_LIMIT = 1024 * 1024 * 1024  # bytes of heap + private mappings the child may use


# --------------------------------------------------------------------- helpers: polygons
def zigzag_percent(vertices, height, width):
    """A polygon (percent points) whose every edge but two spans the image's full height."""
    n = vertices - 2
    x = np.linspace(0.3, width - 0.3, n)
    y = np.where(np.arange(n) % 2, 0.1, height - 0.1)
    xy = np.concatenate([np.stack([x, y], axis=1), [[width - 0.3, height - 0.05], [0.3, height - 0.05]]])
    return (xy / [width, height] * 100).tolist()


def polygon_result(points):
    return {"type": "polygonlabels", "id": "zz", "value": {"points": points, "polygonlabels": ["Cell"]}}


# The same helpers in the child process of `run_isolated`, from their source.
POLYGON_HELPERS = "\n\n".join(inspect.getsource(helper) for helper in (zigzag_percent, polygon_result))

CHILD_PROGRAM = """
import json, resource, time, tracemalloc
resource.setrlimit(resource.RLIMIT_DATA, (@LIMIT@, @LIMIT@))
import numpy as np
from backends.label_studio.regions import results_to_class_mask
@HELPERS@
tracemalloc.start()
started = time.process_time()
try:
@BODY@
    outcome = {"result": result}
except MemoryError:
    outcome = {"error": "MemoryError"}
outcome["seconds"] = time.process_time() - started
outcome["peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
print(json.dumps(outcome))
"""


def run_isolated(body: str, timeout_s: float = 60) -> dict:
    """Run `body` (Python that sets `result`) in a child limited to CHILD_DATA_LIMIT bytes of data;
    returns {"result", "peak_mb" (tracemalloc), "seconds" (CPU)}, or {"error": "MemoryError", ...}."""
    program = (
        CHILD_PROGRAM.replace("@LIMIT@", str(CHILD_DATA_LIMIT))
        .replace("@HELPERS@", POLYGON_HELPERS)
        .replace("@BODY@", textwrap.indent(textwrap.dedent(body).strip(), "    "))
    )
    env = {**os.environ, "PYTHONPATH": str(CODE_ROOT)}  # the child imports the code under test
    child = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=timeout_s, cwd=CODE_ROOT, env=env
    )
    lines = child.stdout.strip().splitlines()
    assert lines, f"the child died (exit {child.returncode}): {child.stderr[-2000:]}"
    return json.loads(lines[-1])


def reference_mask(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """The rasteriser before issue 8 (all crossings at once), for equality checks on small cases."""
    mask = np.zeros((height, width), dtype=bool)
    xy = np.asarray(polygon, dtype=np.float64)
    start, end = xy, np.roll(xy, -1, axis=0)
    y_low, y_high = np.minimum(start[:, 1], end[:, 1]), np.maximum(start[:, 1], end[:, 1])
    first_row = np.clip(np.ceil(y_low - 0.5), 0, height).astype(np.int64)
    stop_row = np.clip(np.ceil(y_high - 0.5), 0, height).astype(np.int64)
    rows_per_edge = stop_row - first_row
    if rows_per_edge.sum() == 0:
        return mask
    edge = np.repeat(np.arange(len(xy)), rows_per_edge)
    edge_start = np.repeat(np.cumsum(rows_per_edge) - rows_per_edge, rows_per_edge)
    row = first_row[edge] + np.arange(edge.size) - edge_start
    y = row + 0.5
    x0, y0, x1, y1 = start[edge, 0], start[edge, 1], end[edge, 0], end[edge, 1]
    column = np.clip(np.ceil(x0 + (y - y0) * (x1 - x0) / (y1 - y0) - 0.5), 0, width).astype(np.int64)
    r0, r1 = int(row.min()), int(row.max()) + 1
    toggles = np.bincount((row - r0) * (width + 1) + column, minlength=(r1 - r0) * (width + 1))
    mask[r0:r1] |= (np.cumsum(toggles.reshape(r1 - r0, width + 1), axis=1) & 1).astype(bool)[:, :width]
    return mask


# --------------------------------------------------------------------- item 3: polygons
def test_a_20000_vertex_zigzag_polygon_is_refused_at_once_naming_the_setting():
    outcome = run_isolated("""
        points = zigzag_percent(20000, 4000, 64)
        mask, warnings = results_to_class_mask([polygon_result(points)], {"Cell": 1}, 4000, 64)
        result = {"painted": int(mask.sum()), "warnings": warnings}
    """)
    assert "error" not in outcome, outcome  # before issue 8: MemoryError (6.8 GB without a limit)
    assert outcome["result"]["painted"] == 0
    (warning,) = outcome["result"]["warnings"]
    assert "20000 vertices" in warning and "POLYGON_MAX_VERTICES" in warning
    assert outcome["peak_mb"] < 50 and outcome["seconds"] < 2, outcome


def test_a_9000_vertex_zigzag_polygon_is_rasterised_in_memory_proportional_to_the_image():
    outcome = run_isolated("""
        points = zigzag_percent(9000, 4000, 64)
        mask, warnings = results_to_class_mask([polygon_result(points)], {"Cell": 1}, 4000, 64)
        result = {"painted": int(mask.sum()), "warnings": warnings, "column_sums": mask.sum(axis=0).tolist()}
    """)
    assert "error" not in outcome, outcome  # before issue 8: MemoryError (3 GB without a limit)
    assert outcome["result"]["warnings"] == []
    # Every column holds its teeth: the zig-zag's area is about half the image, spread evenly.
    assert 0.4 * 4000 * 64 < outcome["result"]["painted"] < 0.6 * 4000 * 64
    assert outcome["peak_mb"] < 50, outcome
    assert outcome["seconds"] < 8, outcome  # ~36 M scanline crossings: about 1.5 s of CPU here


def test_a_polygon_crossing_too_many_rows_in_all_is_refused_before_any_work():
    outcome = run_isolated("""
        points = zigzag_percent(10000, 200000, 8)
        mask, warnings = results_to_class_mask([polygon_result(points)], {"Cell": 1}, 200000, 8)
        result = {"warnings": warnings}
    """)
    assert "error" not in outcome, outcome
    (warning,) = outcome["result"]["warnings"]
    assert "rows in total" in warning and "POLYGON_MAX_VERTICES" in warning
    assert outcome["seconds"] < 2, outcome


def test_the_banded_rasteriser_equals_the_old_one_on_zigzags_and_random_self_intersecting_polygons(monkeypatch):
    import backends.masks.polygons as polygons

    monkeypatch.setattr(polygons, "_BAND_ELEMENTS", 97)  # many small bands, even on small images
    rng = np.random.default_rng(8)
    zigzag = np.array(zigzag_percent(9000, 50, 300)) / 100 * [300, 50]
    cases = [(zigzag, 50, 300)]
    for _ in range(40):
        height, width = int(rng.integers(5, 60)), int(rng.integers(5, 60))
        points = rng.uniform(-10, 70, (int(rng.integers(3, 40)), 2))
        cases.append((points, height, width))
    cases.append((np.array([[0.5, 0.5], [1e11, 3.5], [2.5, 9.5]]), 12, 12))  # a far vertex, cut at the image
    for polygon, height, width in cases:
        ours = polygons.polygons_to_mask([polygon], height, width)
        assert np.array_equal(ours, reference_mask(polygon, height, width)), (height, width, len(polygon))


def test_many_large_regions_cost_one_regions_memory_under_every_overlap_rule():
    # 60 triangles over a 1000 x 1000 image: before, every region's mask was held (60 MB of crops).
    outcome = run_isolated("""
        regions = [polygon_result([[0, 0], [100, 0], [0, 100]]) for _ in range(60)]
        peaks = {}
        for rule in ("later", "earlier", "smaller"):
            tracemalloc.reset_peak()
            mask, warnings = results_to_class_mask(regions, {"Cell": 1}, 1000, 1000, overlap=rule)
            peaks[rule] = tracemalloc.get_traced_memory()[1] / 2**20
        result = {"peaks": peaks, "painted": int(mask.sum())}
    """)
    assert "error" not in outcome, outcome
    assert outcome["result"]["painted"] == 499500  # pixel centres strictly inside: c + r <= 998
    assert max(outcome["result"]["peaks"].values()) < 12, outcome  # class mask 1 MB + one region's scratch


def test_polygon_vertex_limit_comes_from_the_environment():
    from backends.settings import Settings

    assert Settings.from_env({}).polygon_max_vertices == 10_000
    assert Settings.from_env({"POLYGON_MAX_VERTICES": "50000"}).polygon_max_vertices == 50_000
    from backends.label_studio.regions import results_to_class_mask

    region = {"type": "polygonlabels", "value": {"points": zigzag_percent(40, 20, 20), "polygonlabels": ["Cell"]}}
    _, warnings = results_to_class_mask([region], {"Cell": 1}, 20, 20, max_polygon_vertices=39)
    assert "more than the 39 allowed (setting POLYGON_MAX_VERTICES)" in warnings[0]
    mask, warnings = results_to_class_mask([region], {"Cell": 1}, 20, 20, max_polygon_vertices=40)
    assert warnings == [] and mask.any()


# --------------------------------------------------------------------- item 10: script fakes
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Nucleus"/><Label value="Cell, large"/><Label value="Golgi body"/>
  </BrushLabels>
</View>"""
H, W = 12, 16


class FakeBlob:
    def __init__(self, store: dict, name: str):
        self.store, self.name = store, name

    def download_as_bytes(self, **_):
        content = self.store[self.name]
        if isinstance(content, Exception):
            raise content
        return content


class FakeBucket:
    def __init__(self, store: dict):
        self.store = store

    def exists(self, **_):
        return True

    def blob(self, name: str) -> FakeBlob:
        return FakeBlob(self.store, name)


class FakeGcs:
    """The slice of google.cloud.storage.Client the scripts use: one bucket of in-memory objects."""

    def __init__(self, objects: dict[str, bytes | Exception]):
        self.objects = objects

    def bucket(self, _name: str) -> FakeBucket:
        return FakeBucket(self.objects)

    def list_blobs(self, _bucket: str, prefix=None, **_):
        return [FakeBlob(self.objects, name) for name in sorted(self.objects) if name.startswith(prefix or "")]


def fake_connection(label_config: str = CONFIG):
    from sdk_scripts.common import LabelStudioConnection

    project = types.SimpleNamespace(id=1, label_config=label_config, title="P")
    ls = types.SimpleNamespace(projects=types.SimpleNamespace(get=lambda id: project))
    return LabelStudioConnection(ls=ls, url="http://label-studio.invalid", api_key="k")


@pytest.fixture
def export_script(monkeypatch):
    """sdk_scripts.export_masks with Label Studio, GCS and the image fetcher faked; `.tasks` is the
    API export, `.objects` the bucket, `.images` the fetcher's images."""
    import sdk_scripts.export_masks as script

    world = types.SimpleNamespace(tasks=[], objects={}, images={})
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://label-studio.invalid")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "k")
    monkeypatch.setattr(script, "connect_label_studio", lambda settings, url=None: fake_connection())
    monkeypatch.setattr(script, "find_project", lambda conn, project: 1)
    monkeypatch.setattr(script, "tasks_from_api", lambda conn, project_id: world.tasks)
    monkeypatch.setattr(script, "image_fetcher", lambda settings, url, direct: FakeImageFetcher(world.images))
    monkeypatch.setattr(script, "gcs_client", lambda settings, credentials=None: FakeGcs(world.objects))
    world.main = lambda *argv: script.main(["--project", "1", "--no-progress", *argv])
    return world


def labelled_task(task_id: int, image: str, cancelled: bool = False) -> dict:
    mask = np.zeros((H, W), bool)
    mask[2:6, 3:9] = True
    annotation = payloads.annotation(100 + task_id, [payloads.brush(mask)], "2026-01-01T00:00:00Z", cancelled)
    return payloads.task(task_id, image, annotations=[annotation])


def stems(folder: Path) -> list[str]:
    return sorted(path.stem for path in folder.iterdir()) if folder.is_dir() else []


# --------------------------------------------------------------------- item 10: export_masks
def test_re_exporting_into_the_same_folder_leaves_exactly_this_exports_pairs(export_script, tmp_path, capsys):
    out = tmp_path / "out"
    export_script.images = {
        f"gs://b/{name}.png": np.full((H, W, 3), i * 40, np.uint8) for i, name in enumerate(["a", "b", "c", "renamed"])
    }
    export_script.tasks = [
        labelled_task(1, "gs://b/a.png"),
        labelled_task(2, "gs://b/b.png"),
        labelled_task(3, "gs://b/c.png"),
    ]
    assert export_script.main("--out", str(out)) == 0
    assert stems(out / "images") == stems(out / "masks") == ["a", "b", "c"]
    (out / "notes.txt").write_text("mine")  # a user's file beside the managed layout

    # Task 1's annotation is now cancelled, task 2's image was renamed, task 3 fails to load.
    export_script.tasks = [
        labelled_task(1, "gs://b/a.png", cancelled=True),
        labelled_task(2, "gs://b/renamed.png"),
        labelled_task(3, "gs://b/gone.png"),
    ]
    assert export_script.main("--out", str(out)) == 1
    for folder in ("images", "masks", "overlays"):
        assert stems(out / folder) == ["renamed"], folder  # before issue 8: a, b and c stayed
    assert [row["stem"] for row in json.loads((out / "tasks.json").read_text())] == ["renamed"]
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == [
        "images",
        "label_map.json",
        "masks",
        "notes.txt",
        "overlays",
        "tasks.json",
    ]

    # --masks-only needs no image (task 3 works now): images/ and overlays/ of the last run go.
    assert export_script.main("--out", str(out), "--masks-only") == 0
    assert stems(out / "masks") == ["gone", "renamed"]
    assert not (out / "images").exists() and not (out / "overlays").exists()


def test_an_export_that_stops_half_way_leaves_the_previous_export_in_place(export_script, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_script.images = {"gs://b/a.png": np.zeros((H, W, 3), np.uint8)}
    export_script.tasks = [labelled_task(1, "gs://b/a.png")]
    assert export_script.main("--out", str(out)) == 0

    class InterruptedAtC(FakeImageFetcher):
        def load(self, uri, task_id=None):
            if uri.endswith("/c.png"):
                raise KeyboardInterrupt  # Ctrl-C after b's pair was written
            return super().load(uri, task_id)

    import sdk_scripts.export_masks as script

    export_script.images["gs://b/b.png"] = np.zeros((H, W, 3), np.uint8)
    monkeypatch.setattr(script, "image_fetcher", lambda *args: InterruptedAtC(export_script.images))
    export_script.tasks = [labelled_task(2, "gs://b/b.png"), labelled_task(3, "gs://b/c.png")]
    assert export_script.main("--out", str(out)) == 130
    assert stems(out / "images") == stems(out / "masks") == ["a"]
    assert not (out / ".export-staging").exists() and not (out / ".export-previous").exists()


@pytest.mark.parametrize("out_name", ["out", "with space's"])
def test_the_printed_train_command_round_trips_through_the_train_cli(
    export_script, tmp_path, capsys, monkeypatch, out_name
):
    import sdk_scripts.export_masks as script
    from segmentation.train import labels_for, parse_args

    out = tmp_path / out_name
    export_script.images = {"gs://b/a.png": np.zeros((H, W, 3), np.uint8)}
    export_script.tasks = [labelled_task(1, "gs://b/a.png")]
    for config, labels in (
        (CONFIG, ["Nucleus", "Cell, large", "Golgi body"]),
        (CONFIG.replace("Cell, large", "Cell"), ["Nucleus", "Cell", "Golgi body"]),
    ):
        monkeypatch.setattr(script, "connect_label_studio", lambda settings, url=None, c=config: fake_connection(c))
        assert export_script.main("--out", str(out)) == 0
        printed = capsys.readouterr().out
        (command,) = [line.removeprefix("train: ") for line in printed.splitlines() if line.startswith("train: ")]
        argv = shlex.split(command)
        assert argv[:3] == ["python", "-m", "segmentation.train"]
        args = parse_args(argv[3:])
        assert (args.images, args.masks) == (out / "images", out / "masks")
        if "," in "".join(labels):
            # segmentation.train splits --labels on commas: the command leaves them out and says why.
            assert "--labels" not in argv and "'Cell, large'" in printed and "note:" in printed
        else:
            assert labels_for(args, []) == labels


def stored_annotation(task_id, image="gs://b/a.png", **task_fields) -> bytes:
    mask = np.zeros((H, W), bool)
    mask[1:4, 1:4] = True
    task = {"id": task_id, "data": {"image": image}, "project": 1, **task_fields}
    return json.dumps({"id": 500, "result": [payloads.brush(mask)], "task": task, "updated_at": "2026-01-01"}).encode()


def test_bad_stored_objects_fail_one_by_one_and_the_export_goes_on(export_script, tmp_path, capsys):
    from google.api_core.exceptions import NotFound

    out = tmp_path / "out"
    deep = b"[" * 100_000 + b"]" * 100_000
    export_script.images = {"gs://b/a.png": np.zeros((H, W, 3), np.uint8)}
    export_script.objects = {
        "exp/1": stored_annotation(1),
        "exp/2": stored_annotation("two"),  # a task id that is not a number
        "exp/3": json.dumps({"id": 3, "result": [], "task": {"id": 3, "data": ["not", "an", "object"]}}).encode(),
        "exp/4": b'{"id": 4, "result": [], "task": {"id": 4, "data": {}, "project": "p"}}',
        "exp/5": b'{"result": [], "task": {"id": 5, "data": {"x": ' + deep + b"}}}",
        "exp/6": b"\xff\xfe not json",
        "exp/7": NotFound("object was deleted"),
        "exp/8": json.dumps(
            {
                "id": 8,
                "result": [
                    {
                        "type": "brushlabels",
                        "original_width": "wide",
                        "value": {"rle": [1, 2], "brushlabels": ["Nucleus"]},
                    }
                ],
                "task": {"id": 8, "data": {"image": "gs://b/eight.png"}},
            }
        ).encode(),
    }
    assert export_script.main("--out", str(out), "--from-bucket", "gs://bkt/exp", "--masks-only") == 1
    printed = capsys.readouterr().out
    failed = [line for line in printed.splitlines() if line.startswith("failed: ")]
    for name in ("exp/2", "exp/3", "exp/4", "exp/5", "exp/6", "exp/7"):
        assert any(f"gs://bkt/{name}" in line for line in failed), (name, printed)
    assert any("task 8" in line for line in failed), printed  # its size is not a number: no mask
    assert "Traceback" not in printed
    assert stems(out / "masks") == ["a"]
    assert "6 stored object(s) unreadable" in printed


# --------------------------------------------------------------------- item 10: import_gcs
@pytest.fixture
def import_script(monkeypatch, tmp_path):
    """sdk_scripts.import_gcs with Label Studio and GCS faked; `.imported` collects created tasks."""
    import sdk_scripts.import_gcs as script

    world = types.SimpleNamespace(imported=[], objects={f"src/{name}.png": b"png" for name in "abcd"})
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://label-studio.invalid")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "k")
    monkeypatch.setattr(script, "connect_label_studio", lambda settings, url=None: fake_connection())
    monkeypatch.setattr(script, "find_project", lambda conn, project: 1)
    monkeypatch.setattr(script, "gcs_client", lambda settings, credentials=None: FakeGcs(world.objects))
    monkeypatch.setattr(script, "existing_image_uris", lambda conn, project_id, key: set())

    def import_tasks(conn, project_id, tasks, batch_size, progress):
        json.dumps(list(tasks), allow_nan=False)  # what Label Studio accepts: strict JSON
        world.imported.extend(tasks)
        return list(range(len(tasks)))

    monkeypatch.setattr(script, "import_tasks", import_tasks)

    def main(manifest_name: str, manifest: str, *argv: str) -> int:
        path = tmp_path / manifest_name
        path.write_text(manifest, encoding="utf-8")
        return script.main(
            ["--project", "1", "--source", "gs://src/src", "--manifest", str(path), "--no-progress", *argv]
        )

    world.main = main
    return world


def imported(world) -> dict[str, dict]:
    return {task["image"].rsplit("/", 1)[1]: {k: v for k, v in task.items() if k != "image"} for task in world.imported}


def test_a_csv_cell_over_128_kib_fails_its_image_and_the_rest_is_imported(import_script, capsys):
    manifest = "image,notes\na.png,short\nb.png," + "x" * 200_000 + "\n"
    assert import_script.main("m.csv", manifest) == 1
    printed = capsys.readouterr().out
    assert imported(import_script) == {"a.png": {"notes": "short"}, "c.png": {}, "d.png": {}}
    assert any(line.startswith("failed: src/b.png") and "200000 characters" in line for line in printed.splitlines())


def test_deep_nesting_and_nan_in_a_json_lines_manifest_fail_per_row(import_script, capsys):
    deep = "[" * 5000 + "]" * 5000
    manifest = "\n".join(
        [
            '{"image": "a.png", "sample": "S1"}',
            '{"image": "b.png", "depth": NaN}',
            '{"image": "c.png", "deep": ' + deep + "}",  # too deep even to read its key
            '{"image": "d.png", "ratio": 1e999}',
        ]
    )
    assert import_script.main("m.jsonl", manifest) == 1
    printed = capsys.readouterr().out
    # c's row is lost, so no image without metadata is imported (c might be the one it described).
    assert imported(import_script) == {"a.png": {"sample": "S1"}}
    failed = "\n".join(line for line in printed.splitlines() if line.startswith("failed: "))
    assert "src/b.png" in failed and "nan" in failed
    assert "src/d.png" in failed and "inf" in failed
    assert "src/c.png" in failed and "unreadable row" in failed
    assert "Traceback" not in printed


def test_nan_in_a_json_manifest_fails_the_dry_run_too(import_script, capsys):
    manifest = '{"a.png": {"sample": "S1"}, "b.png": {"score": NaN}, "c.png": {"n": {"n": {"n": 1}}}}'
    assert import_script.main("m.json", manifest, "--dry-run") == 1  # before issue 8: accepted, exit 0
    printed = capsys.readouterr().out
    assert "failed: src/b.png" in printed and "score is nan" in printed
    would = [line for line in printed.splitlines() if line.startswith("would import: {")]
    assert len(would) == 3 and all("src/b.png" not in line for line in would)  # a, c (with metadata) and d
    assert import_script.imported == []


def test_a_json_manifest_nested_too_deep_to_read_is_a_clear_error(import_script, capsys):
    manifest = '{"a.png": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    assert import_script.main("m.json", manifest) == 2  # before issue 8: a RecursionError traceback
    error = capsys.readouterr().err
    assert "nested too deeply" in error and "Traceback" not in error
    assert import_script.imported == []


def test_a_sidecar_with_nan_holds_back_its_image(import_script, capsys):
    import_script.objects["src/b.png.json"] = b'{"score": NaN}'
    import_script.objects["src/c.png.json"] = b'{"d": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert import_script.main("m.csv", "image,notes\na.png,x\n") == 1
    printed = capsys.readouterr().out
    assert imported(import_script) == {"a.png": {"notes": "x"}, "d.png": {}}
    assert "failed: src/b.png" in printed and "failed: src/c.png" in printed


# --------------------------------------------------------------------- item 11a
NOT_AN_IMAGE_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Text name="caption" value="$caption"/>
  <BrushLabels name="tag" toName="caption,image"><Label value="Nucleus"/></BrushLabels>
</View>"""


def test_a_brush_tag_on_a_non_image_tag_is_a_clear_4xx_not_a_500(tmp_path, constant_model):
    with HttpHost({"/ok.png": png(np.zeros((8, 8, 3), np.uint8))}) as images:
        settings = base_settings(tmp_path, seg_checkpoint=str(constant_model), image_allowed_hosts=(images.netloc,))
        with segmentation_client(settings) as client:
            body = payloads.predict_body([payloads.task(1, f"{images.url}/ok.png")], config=NOT_AN_IMAGE_CONFIG)
            response = client.post("/predict", json=body)
            assert 400 <= response.status_code < 500, (response.status_code, response.text)  # before: 500 KeyError
            assert "caption" in response.text and "Image" in response.text
            good = payloads.predict_body(
                [payloads.task(1, f"{images.url}/ok.png")], config=NOT_AN_IMAGE_CONFIG.replace("caption,image", "image")
            )
            assert client.post("/predict", json=good).status_code == 200  # still serving
