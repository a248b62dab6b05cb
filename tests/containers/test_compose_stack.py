"""`docker compose --profile dev up` for real: the project's docker-compose.yml on a Docker engine.

Images built here (devstack.containers) stand in for the pulled ones; an override file swaps only
their names. Checked, in order: every service turns healthy through its own healthcheck, with its
ports on loopback only; the backends reach Label Studio by its service name; setup_project and
import_gcs run from the host against the stack (buckets in the fake-gcs-server container); a smart
rectangle sent through Label Studio reaches the SAM container and comes back as the right mask;
"Start training" makes the segmentation container write a version into its volume, which is still
served after `docker-compose restart segmentation`. `down -v` removes everything at the end, also
after a failure.
"""

from __future__ import annotations

import contextlib
import io
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from backends.masks.rle import decode_rle
from devstack.containers import Images
from devstack.gcs import emulator_client
from sdk_scripts import import_gcs, setup_project
from tests.containers.compose import COMPOSE_FILE, ComposeStack
from tests.support.masks import iou
from tests.support.payloads import SMART_ONLY_CONFIG, brush, rectangle_around

pytestmark = pytest.mark.e2e

SERVICES = ("label-studio", "fake-gcs-server", "segmentation", "sam")
HEALTHY_TIMEOUT_S = 420.0  # Label Studio migrates an empty database first (start_period 120 s)
# Training kept short on 2 cores; TRAIN_EVERY high so that only "Start training" trains.
BACKEND_ENV = {"DEVICE": "cpu", "TRAIN_MINUTES": "0.3", "TRAIN_EVERY": "1000", "VAL_FRACTION": "0.2"}
TRAINING_DEADLINE_S = 240.0
N_IMAGES = 6
SIDE = 128


# ---------------------------------------------------------------- synthetic nuclei (pure)
def nuclei_image(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(SIDE x SIDE x 3 uint8 image, SIDE x SIDE bool mask): three bright disks on dark noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:SIDE, :SIDE]
    mask = np.zeros((SIDE, SIDE), bool)
    for row, col in ((32, 36), (44, 92), (94, 60)):
        radius = rng.integers(11, 16)
        mask |= (rows - row - rng.integers(-4, 5)) ** 2 + (cols - col - rng.integers(-4, 5)) ** 2 <= radius**2
    gray = np.where(mask, rng.normal(200, 12, mask.shape), rng.normal(30, 8, mask.shape))
    image = np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return image, mask


def first_disk(mask: np.ndarray) -> np.ndarray:
    """The connected disk of `mask` in the top-left quarter (the first one drawn)."""
    quarter = np.zeros_like(mask)
    quarter[: SIDE // 2, : SIDE // 2] = True
    return mask & quarter


def png_bytes(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def no_proxy_session(token: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only
    session.headers["Authorization"] = f"Token {token}"
    return session


# ---------------------------------------------------------------- the stack
@pytest.fixture(scope="module")
def stack(built_images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    stack = ComposeStack(
        workdir=tmp_path_factory.mktemp("compose"),
        images=built_images.by_service(),
        env_overrides=BACKEND_ENV,
    )
    try:
        started = time.monotonic()
        stack.up()
        stack.wait_healthy(SERVICES, HEALTHY_TIMEOUT_S)
        stack.seconds_to_healthy = time.monotonic() - started
        print(f"\n[containers] docker-compose up -> all healthy: {stack.seconds_to_healthy:.0f} s")
        yield stack
    finally:
        stack.down()
        leftovers = stack.leftovers()
        assert not any(leftovers.values()), f"left behind by {stack.project}: {leftovers}"


@dataclass
class GcsProject:
    project_id: int
    tasks: dict[str, int]  # gs:// URI -> task id
    masks: dict[str, np.ndarray]  # gs:// URI -> SIDE x SIDE bool
    ml_ids: dict[str, int]  # backend URL -> ML backend id in Label Studio
    setup_output: str
    import_output: str


@pytest.fixture(scope="module")
def gcs_project(stack: ComposeStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsProject]:
    """Buckets filled from the host, then setup_project and import_gcs run from the host."""
    label_config = tmp_path_factory.mktemp("label-config") / "label_config.xml"
    label_config.write_text(SMART_ONLY_CONFIG)  # a brush tag to train on, a smart rectangle for SAM
    run_id = uuid.uuid4().hex[:8]
    source, target, title = f"src-{run_id}", f"dst-{run_id}", f"compose {run_id}"
    client = emulator_client(stack.url("fake-gcs-server"))
    client.create_bucket(source)
    client.create_bucket(target)
    masks = {}
    for index in range(N_IMAGES):
        image, mask = nuclei_image(index)
        name = f"images/nuclei-{index}.png"
        client.bucket(source).blob(name).upload_from_string(png_bytes(image), content_type="image/png")
        masks[f"gs://{source}/{name}"] = mask
    manifest = "".join(f'{{"image": "nuclei-{i}.png", "sample": "S{i}", "stain": "DAPI"}}\n' for i in range(N_IMAGES))
    client.bucket(source).blob("manifest.jsonl").upload_from_string(manifest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LABEL_STUDIO_URL", stack.url("label-studio"))
        patch.setenv("LABEL_STUDIO_API_KEY", stack.token)
        patch.setenv("STORAGE_EMULATOR_HOST", stack.url("fake-gcs-server"))
        patch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            patch.delenv(name, raising=False)
        patch.setenv("NO_PROXY", "127.0.0.1,localhost")
        setup_output = _run_script(
            setup_project.main,
            [
                "--title",
                title,
                "--label-config",
                str(label_config),
                "--source",
                f"gs://{source}/images",
                "--target",
                f"gs://{target}/annotations",
                # As Label Studio reaches them: service names on the compose network.
                "--seg-url",
                "http://segmentation:7070",
                "--sam-url",
                "http://sam:9090",
                "--no-progress",
            ],
        )
        project_id = int(setup_output.strip().splitlines()[-1].split()[1].rstrip(":"))
        import_output = _run_script(
            import_gcs.main,
            [
                "--project",
                str(project_id),
                "--source",
                f"gs://{source}/images",
                "--manifest",
                f"gs://{source}/manifest.jsonl",
                "--no-progress",
            ],
        )
    http = no_proxy_session(stack.token)
    base = stack.url("label-studio")
    tasks = http.get(
        f"{base}/api/tasks", params={"project": project_id, "page_size": 100, "resolve_uri": "false"}, timeout=30
    ).json()
    task_list = tasks["tasks"] if isinstance(tasks, dict) else tasks
    ml = http.get(f"{base}/api/ml", params={"project": project_id}, timeout=30).json()
    yield GcsProject(
        project_id=project_id,
        tasks={task["data"]["image"]: task["id"] for task in task_list},
        masks=masks,
        ml_ids={backend["url"]: backend["id"] for backend in ml},
        setup_output=setup_output,
        import_output=import_output,
    )


def _run_script(main, args: list[str]) -> str:
    """Run an sdk_scripts `main(args)` in this process; its printed report, or a failure quoting it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    assert code == 0, out.getvalue()
    return out.getvalue()


def compose_healthcheck(service: str) -> list[str]:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"][service]["healthcheck"]["test"]


def backend_json(stack: ComposeStack, service: str, path: str) -> dict:
    with requests.Session() as session:
        session.trust_env = False
        response = session.get(f"{stack.url(service)}{path}", timeout=10)
    assert response.status_code == 200, (service, path, response.status_code, response.text[:300])
    return response.json()


# ---------------------------------------------------------------- tests
def test_every_service_is_healthy_through_its_own_healthcheck(stack: ComposeStack):
    ids = stack.container_ids()
    assert set(ids) == set(SERVICES), ids
    for service, container in ids.items():
        details = stack.inspect(container)
        assert details["Config"]["Healthcheck"]["Test"] == compose_healthcheck(service), service
        health = details["State"]["Health"]
        assert health["Status"] == "healthy", (service, health["Log"][-1:])
        assert health["Log"][-1]["ExitCode"] == 0, service
        if service in ("segmentation", "sam"):
            assert details["Config"]["User"] == "backend", service  # the images' unprivileged user
        published = [b for bindings in details["NetworkSettings"]["Ports"].values() for b in bindings or []]
        assert published and all(b["HostIp"] == "127.0.0.1" for b in published), (service, published)
    assert 0 < stack.seconds_to_healthy < HEALTHY_TIMEOUT_S


def test_backends_reach_label_studio_by_service_name(stack: ComposeStack):
    probe = "import urllib.request as u; print(u.urlopen('http://label-studio:8080/health', timeout=5).status)"
    for service in ("segmentation", "sam"):
        result = stack.run("exec", "-T", service, "python", "-c", probe, check=False, timeout=60)
        assert result.stdout.strip() == "200", (service, result.stdout, result.stderr[-500:])
        deadline = time.monotonic() + 30
        while (report := backend_json(stack, service, "/health")).get("label_studio") != "reachable":
            assert time.monotonic() < deadline, (service, report)
            time.sleep(1)


def test_setup_project_and_import_gcs_run_from_the_host(stack: ComposeStack, gcs_project: GcsProject):
    assert gcs_project.setup_output.count("created") >= 3, gcs_project.setup_output
    assert stack.token not in gcs_project.setup_output + gcs_project.import_output
    assert f"imported:                {N_IMAGES}" in gcs_project.import_output, gcs_project.import_output
    assert set(gcs_project.tasks) == set(gcs_project.masks)
    # Label Studio accepted both backends at their service-name URLs (it called their /health and /setup).
    assert set(gcs_project.ml_ids) == {"http://segmentation:7070", "http://sam:9090"}, gcs_project.ml_ids


def test_smart_rectangle_through_label_studio_reaches_the_sam_container(stack: ComposeStack, gcs_project: GcsProject):
    uri = sorted(gcs_project.tasks)[0]
    truth = first_disk(gcs_project.masks[uri])
    http = no_proxy_session(stack.token)
    response = http.post(
        f"{stack.url('label-studio')}/api/ml/{gcs_project.ml_ids['http://sam:9090']}/interactive-annotating",
        json={"task": gcs_project.tasks[uri], "context": {"result": [rectangle_around(truth)]}},
        timeout=180,
    )
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert "errors" not in body, body["errors"]
    brushes = [region for region in body["data"]["result"] if region["type"] == "brushlabels"]
    assert len(brushes) == 1, body["data"]["result"]
    value = brushes[0]["value"]
    mask = decode_rle(value["rle"], brushes[0]["original_height"], brushes[0]["original_width"])
    assert value["brushlabels"] == ["Nucleus"]
    assert iou(mask, truth) > 0.7, iou(mask, truth)
    # The image came from the bucket through Label Studio into the SAM container.
    assert "classic" in backend_json(stack, "sam", "/health")["engine"]


def test_training_writes_a_version_to_the_volume_that_survives_a_restart(stack: ComposeStack, gcs_project: GcsProject):
    http = no_proxy_session(stack.token)
    base = stack.url("label-studio")
    for index, uri in enumerate(sorted(gcs_project.tasks)):
        response = http.post(
            f"{base}/api/tasks/{gcs_project.tasks[uri]}/annotations/",
            json={"result": [brush(gcs_project.masks[uri], "Nucleus", f"b{index}")]},
            timeout=60,
        )
        assert response.status_code == 201, response.text[:300]
    ml_id = gcs_project.ml_ids["http://segmentation:7070"]
    response = http.post(f"{base}/api/ml/{ml_id}/train", json={}, timeout=60)
    assert response.status_code == 200, response.text[:300]

    project_key = str(gcs_project.project_id)
    version = wait_for_version(stack, project_key, TRAINING_DEADLINE_S)
    listing = stack.run("exec", "-T", "segmentation", "find", "/models", "-maxdepth", "3", timeout=60).stdout
    assert version in listing, listing

    stack.run("restart", "segmentation", timeout=180)
    stack.wait_healthy(["segmentation"], timeout=180)
    versions = backend_json(stack, "segmentation", "/versions")["versions"]
    assert [v["version"] for v in versions if v["project"] == project_key and v["current"]] == [version]
    restarted = stack.run("exec", "-T", "segmentation", "find", "/models", "-maxdepth", "3", timeout=60).stdout
    assert version in restarted


def wait_for_version(stack: ComposeStack, project_key: str, deadline_s: float) -> str:
    """The project's current version once training is over; fails at once when training failed."""
    deadline = time.monotonic() + deadline_s
    project_health: dict = {}
    while time.monotonic() < deadline:
        project_health = backend_json(stack, "segmentation", "/health").get("projects", {}).get(project_key, {})
        assert project_health.get("state") != "failed", f"training failed: {project_health}\n{stack.logs()}"
        current = [
            v["version"]
            for v in backend_json(stack, "segmentation", "/versions")["versions"]
            if v["project"] == project_key and v["current"]
        ]
        if current and project_health.get("state") == "idle":
            return current[0]
        time.sleep(3)
    raise AssertionError(f"no version after {deadline_s:.0f} s: {project_health}\n{stack.logs()}")
