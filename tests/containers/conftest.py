"""The container suite: real images built here, the real docker-compose.yml run on a real Docker
engine. Skipped, saying why, only where no Docker engine can be reached; in CI (CI=true) a missing
engine, docker-compose or debootstrap is a failure (.ci/run installs them and starts dockerd)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.containers import Images, Timings, base_tag, build_images, image_exists, image_size_mb
from tests.containers.compose import compose_binary
from tests.support.ci import unavailable

CONTAINERS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test in this folder drives a real Docker engine: mark it even if its module forgets.
    for item in items:
        if CONTAINERS_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def compose_command() -> list[str]:
    """docker-compose on PATH (no engine needed for `config`)."""
    command = compose_binary()
    if command is None:
        unavailable("neither docker-compose nor the `docker compose` plugin is installed")
    assert command is not None
    return command


@pytest.fixture(scope="session")
def docker_engine(compose_command: list[str]) -> None:
    """A Docker engine that answers (`docker info`), and debootstrap for the base image."""
    if shutil.which("docker") is None:
        unavailable("the docker client is not installed (apt-get install docker.io)")
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        unavailable(f"no Docker engine answers `docker info`: {probe.stderr.strip()[:300]}")
    if not image_exists(base_tag()):
        if shutil.which("debootstrap") is None and not Path("/usr/sbin/debootstrap").exists():
            unavailable("debootstrap is not installed (the base image is built from Debian packages)")
        if os.geteuid() != 0:
            unavailable("debootstrap needs root to build the base image once (then it is cached)")


@pytest.fixture(scope="session")
def container_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("container-logs")


@pytest.fixture(scope="session")
def built_images(docker_engine: None, container_logs: Path) -> Iterator[Images]:
    """Base, backends, Label Studio and fake-gcs-server images (reused where up to date)."""
    timings = Timings()
    images = build_images(container_logs, timings)
    report = [f"{step}: {seconds:.1f} s" for step, seconds in timings.steps.items()]
    report += [
        f"{name}: {tag} {image_size_mb(tag):.0f} MB"
        for name, tag in {"base": images.base, **images.by_service()}.items()
    ]
    print("\n[containers] " + "\n[containers] ".join(report))
    yield images
