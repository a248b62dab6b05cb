"""The real stack comes up on loopback: Label Studio, the GCS emulator, a connected backend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devstack import demo
from devstack.gcs import upload_objects
from devstack.processes import group_alive
from tests.support.payloads import SMART_ONLY_CONFIG

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
LABEL_CONFIG = SMART_ONLY_CONFIG


def _png(path: Path, height: int = 48, width: int = 64) -> Path:
    image = np.zeros((height, width, 3), np.uint8)
    image[10:30, 20:40] = 200
    Image.fromarray(image).save(path)
    return path


def test_label_studio_answers_with_the_legacy_token(label_studio):
    whoami = label_studio.http.get(f"{label_studio.url}/api/current-user/whoami", timeout=10)
    assert whoami.status_code == 200
    assert whoami.json()["email"] == label_studio.username


def test_gcs_emulator_stores_objects(gcs_emulator):
    uris = upload_objects(gcs_emulator.storage, "smoke-bucket", {"dir/a.txt": b"hello"})
    assert uris == ["gs://smoke-bucket/dir/a.txt"]
    blob = gcs_emulator.storage.bucket("smoke-bucket").blob("dir/a.txt")
    assert blob.download_as_bytes() == b"hello"


def test_project_upload_and_backend_connection(label_studio, start_backend, tmp_path):
    ls = label_studio.ls
    project = ls.projects.create(title="smoke", label_config=LABEL_CONFIG)
    task_ids = label_studio.upload_files(project.id, [_png(tmp_path / "a.png"), _png(tmp_path / "b.png")])
    assert len(task_ids) == 2
    tasks = {task.id: task for task in ls.tasks.list(project=project.id)}
    assert sorted(tasks) == sorted(task_ids)
    for task_id, name in zip(task_ids, ["a.png", "b.png"], strict=True):
        image = tasks[task_id].data["image"]
        assert image.startswith("/data/upload/") and image.endswith(name), image

    backend = start_backend("sam")
    assert backend.health()["status"] == "UP"
    ml = ls.ml.create(project=project.id, url=backend.url, title="SAM", is_interactive=True)
    state = ls.ml.get(id=ml.id).state
    assert state == "CO", f"Label Studio reports the backend as {state!r}; backend log: {backend.log_path}"
    # Connected for real only if Label Studio also registered the backend's webhook.
    webhooks = label_studio.http.get(
        f"{label_studio.url}/api/webhooks/", params={"project": project.id}, timeout=10
    ).json()
    assert f"{backend.url}/webhook" in [hook["url"] for hook in webhooks], webhooks


def test_demo_starts_imports_and_stops(label_studio_installed_or_skip, tmp_path, capsys):
    layout = demo.DemoLayout(run_dir=tmp_path / "run", default_ports=False)
    try:
        assert demo.start(layout) == 0
        state = json.loads(layout.state_file.read_text())
        assert [service["name"] for service in state["services"]] == [
            "fake-gcs-server",
            "label-studio",
            "segmentation",
            "sam",
        ]
        assert demo.status(layout) == 0

        from label_studio_sdk import LabelStudio

        ls = LabelStudio(base_url=state["label_studio"]["url"], api_key=state["label_studio"]["token"])
        (project,) = [p for p in ls.projects.list() if p.title == demo.PROJECT_TITLE]
        tasks = list(ls.tasks.list(project=project.id, resolve_uri=False))
        images, rows = demo.demo_dataset()
        assert sorted(task.data["image"] for task in tasks) == sorted(
            f"gs://{demo.SOURCE_BUCKET}/images/{name}" for name in images
        )
        assert {task.data["sample"] for task in tasks} == {row["sample"] for row in rows}
        backends = ls.ml.list(project=project.id)
        assert sorted(b.url for b in backends) == sorted(s["url"] for s in state["services"][2:])
        assert all(b.state == "CO" for b in backends)

        capsys.readouterr()
        assert demo.start(layout) == 0  # a second start changes nothing
        assert "already running" in capsys.readouterr().out
    finally:
        demo.stop(layout)
    assert not layout.state_file.exists()
    assert not any(group_alive(service["pid"]) for service in state["services"])
    assert demo.status(layout) == 1
