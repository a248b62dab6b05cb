"""docker-compose's own loader on the real files (no containers), and the real build context.

`docker-compose config` resolves docker-compose.yml (with every profile) and docker-compose.gpu.yml
with .env.example exactly as `up` would; the values the README promises are checked in its output
(Debian's docker-compose 1.29 misreads nested ${...} and braces inside defaults without an error,
so a wrong value here is the only symptom). The .dockerignore test sends the repository root to
the engine as a build context and lists what arrived.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from devstack.processes import REPO_ROOT
from tests.containers.compose import COMPOSE_FILE, ENV_EXAMPLE, GPU_OVERRIDE, PASSED_ENV, parse_env_file

pytestmark = pytest.mark.e2e

GOOGLE_DOWNLOAD_URL = "https://storage.googleapis.com/download/storage/v1/b/{bucket_name}/o/{blob_name}?alt=media"
BACKENDS = ("segmentation", "sam")


def compose_config(command: list[str], tmp_path: Path, *files: Path, profiles: tuple[str, ...] = ()) -> dict:
    env_file = tmp_path / ".env"
    env_file.write_text(ENV_EXAMPLE.read_text())
    argv = [*command, "--project-directory", str(REPO_ROOT), "--env-file", str(env_file)]
    for path in files:
        argv += ["-f", str(path)]
    for profile in profiles:
        argv += ["--profile", profile]
    env = {key: os.environ[key] for key in PASSED_ENV if key in os.environ}
    result = subprocess.run([*argv, "config"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_resolves_the_real_file_as_the_readme_says(compose_command, tmp_path):
    config = compose_config(compose_command, tmp_path, COMPOSE_FILE, profiles=("dev", "scale"))
    example = parse_env_file(ENV_EXAMPLE.read_text())
    assert "${" not in yaml.safe_dump(config), "an interpolation was left unresolved"
    services = config["services"]
    assert {"label-studio", "fake-gcs-server", *BACKENDS} <= set(services)
    ls_env = services["label-studio"]["environment"]
    assert ls_env["LABEL_STUDIO_RESOLVER_PROXY_GCS_DOWNLOAD_URL"] == GOOGLE_DOWNLOAD_URL
    assert ls_env["LABEL_STUDIO_USER_TOKEN"] == example["LABEL_STUDIO_USER_TOKEN"]
    for name in BACKENDS:
        env = services[name]["environment"]
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        # Empty key: backends/settings.py falls back to the admin's token, handed over here.
        assert (
            env["LABEL_STUDIO_API_KEY"] == "" and env["LABEL_STUDIO_USER_TOKEN"] == example["LABEL_STUDIO_USER_TOKEN"]
        )
    assert services["sam"]["environment"]["SAM_MODEL_TYPE"] == "vit_b"


def test_gpu_override_is_accepted_and_reserves_a_gpu_per_backend(compose_command, tmp_path):
    config = compose_config(compose_command, tmp_path, COMPOSE_FILE, GPU_OVERRIDE)
    for name in BACKENDS:
        service = config["services"][name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and int(device["count"]) == 1
        assert service["environment"]["DEVICE"] == "cuda"
        assert service["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cu128"
        assert service["image"].endswith(":cuda")


def test_dockerignore_keeps_the_build_context_small(docker_engine, tmp_path):
    """Build `COPY . /context/` from the repository root and list what the engine received."""
    tag = f"ls-segmentation-assist-test/context:{uuid.uuid4().hex[:8]}"
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM scratch\nCOPY . /context/\n")
    build = subprocess.run(
        ["docker", "build", "-q", "-f", str(dockerfile), "-t", tag, str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "DOCKER_BUILDKIT": "0"},
    )
    assert build.returncode == 0, build.stderr[-2000:]
    container = ""
    try:
        size = int(subprocess.check_output(["docker", "image", "inspect", "--format", "{{.Size}}", tag], text=True))
        container = subprocess.check_output(["docker", "create", tag, "none"], text=True).strip()
        listing = subprocess.run(
            f"docker export {container} | tar -t", shell=True, capture_output=True, text=True, timeout=120
        ).stdout.split()
    finally:
        if container:
            subprocess.run(["docker", "rm", container], capture_output=True, timeout=60)
        subprocess.run(["docker", "rmi", tag], capture_output=True, timeout=60)
    names = {path.removeprefix("context/").rstrip("/") for path in listing if path.startswith("context/")}
    for needed in ("pyproject.toml", "backends/settings.py", "sam/Dockerfile", "segmentation/Dockerfile", "devstack"):
        assert needed in names, f"{needed} is missing from the build context"
    for kept_out in (".venv", ".venv-ls", ".git", "run", "tests", ".env", ".hypothesis", "README.md"):
        assert not any(name == kept_out or name.startswith(kept_out + "/") for name in names), kept_out
    assert not any("__pycache__" in name for name in names)
    assert size < 10_000_000, f"build context is {size / 1e6:.1f} MB"
