"""The project's real docker-compose.yml, run by docker-compose with a small override file.

The override only swaps image names (the images devstack.containers builds here stand in for the
ones a real host pulls or builds); everything else -- services, healthchecks, volumes, networks,
environment -- comes from the real file and an env file made from .env.example. Ports are published
on loopback only (LABEL_STUDIO_PORT=127.0.0.1:PORT; the others already are), the project name is
unique per run, and `down -v` removes containers, networks and volumes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devstack.processes import REPO_ROOT, free_port

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
GPU_OVERRIDE = REPO_ROOT / "docker-compose.gpu.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
# What docker-compose may see of this process's environment: the env file decides the rest
# (a stray DEVICE or LOG_LEVEL in the shell would otherwise win over it).
PASSED_ENV = ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY")


class ComposeError(RuntimeError):
    """A docker-compose command failed or a service did not become healthy in time."""


def compose_binary() -> list[str] | None:
    """docker-compose (v1, Debian's) or the `docker compose` plugin, whichever is here."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def parse_env_file(text: str) -> dict[str, str]:
    """`KEY=value` lines (comments and blank lines skipped), in order."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def override_yaml(images: Mapping[str, str]) -> str:
    """A compose override that sets only `image:` of the given services (JSON is YAML)."""
    return json.dumps({"services": {name: {"image": tag} for name, tag in images.items()}}, indent=2)


@dataclass
class Ports:
    label_studio: int
    segmentation: int
    sam: int
    fake_gcs: int

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port(), free_port())


@dataclass
class ComposeStack:
    """One compose project on this Docker engine (`up`, `ps`, `restart`, `down -v`)."""

    workdir: Path
    images: Mapping[str, str]
    env_overrides: Mapping[str, str] = field(default_factory=dict)
    profiles: Sequence[str] = ("dev",)
    project: str = field(default_factory=lambda: f"lssa-test-{uuid.uuid4().hex[:8]}")
    ports: Ports = field(default_factory=Ports.free)
    token: str = field(default_factory=lambda: secrets.token_hex(20))
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    username: str = "admin@example.com"
    seconds_to_healthy: float = 0.0  # from `up` to every service healthy, set by whoever waits

    def __post_init__(self) -> None:
        command = compose_binary()
        if command is None:
            raise ComposeError("neither docker-compose nor `docker compose` is installed")
        self.command = command
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.override_file = self.workdir / "docker-compose.images.yml"
        self.override_file.write_text(override_yaml(self.images))
        self.env_file = self.workdir / ".env"
        self.env_file.write_text("".join(f"{key}={value}\n" for key, value in self.env().items()))

    # ---------------------------------------------------------------- configuration
    def env(self) -> dict[str, str]:
        """.env.example, then this run's credentials, loopback ports and emulator URLs."""
        env = parse_env_file(ENV_EXAMPLE.read_text())
        env.update(
            LABEL_STUDIO_USERNAME=self.username,
            LABEL_STUDIO_PASSWORD=self.password,
            LABEL_STUDIO_USER_TOKEN=self.token,
            LABEL_STUDIO_PORT=f"127.0.0.1:{self.ports.label_studio}",
            SEGMENTATION_PORT=str(self.ports.segmentation),
            SAM_PORT=str(self.ports.sam),
            FAKE_GCS_PORT=str(self.ports.fake_gcs),
            LS_STORAGE_EMULATOR_HOST="http://fake-gcs-server:4443",
            LS_GCS_DOWNLOAD_URL="http://fake-gcs-server:4443/download/storage/v1/b/{bucket_name}/o/{blob_name}?alt=media",
        )
        env.update(self.env_overrides)
        return env

    def url(self, service: str) -> str:
        port = {
            "label-studio": self.ports.label_studio,
            "segmentation": self.ports.segmentation,
            "sam": self.ports.sam,
            "fake-gcs-server": self.ports.fake_gcs,
        }[service]
        return f"http://127.0.0.1:{port}"

    # ---------------------------------------------------------------- commands
    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [
            *self.command,
            "--project-name",
            self.project,
            "--project-directory",
            str(REPO_ROOT),
            "--env-file",
            str(self.env_file),
            "-f",
            str(COMPOSE_FILE),
            "-f",
            str(self.override_file),
            *(item for profile in self.profiles for item in ("--profile", profile)),
            *args,
        ]
        env = {key: os.environ[key] for key in PASSED_ENV if key in os.environ}
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise ComposeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    def up(self, timeout: float = 600) -> None:
        # --no-build: the images are built beforehand; compose must not build the real tags.
        self.run("up", "-d", "--no-build", timeout=timeout)

    def container_ids(self) -> dict[str, str]:
        """service -> container id, for the running services."""
        ids = {}
        for service in self.run("ps", "--services").stdout.split():
            container = self.run("ps", "-q", service).stdout.strip()
            if container:
                ids[service] = container
        return ids

    def inspect(self, container: str) -> dict:
        out = subprocess.run(["docker", "inspect", container], capture_output=True, text=True, timeout=60, check=True)
        return json.loads(out.stdout)[0]

    def health(self) -> dict[str, str]:
        """service -> Docker's health status (starting | healthy | unhealthy | none)."""
        statuses = {}
        for service, container in self.container_ids().items():
            state = self.inspect(container)["State"]
            statuses[service] = state.get("Health", {}).get("Status", "none")
        return statuses

    def wait_healthy(self, services: Sequence[str], timeout: float) -> float:
        """Seconds until every one of `services` reports healthy; ComposeError with their logs otherwise."""
        started = time.monotonic()
        statuses: dict[str, str] = {}
        while time.monotonic() - started < timeout:
            statuses = self.health()
            if all(statuses.get(name) == "healthy" for name in services):
                return time.monotonic() - started
            if any(statuses.get(name) == "unhealthy" for name in services):
                break
            time.sleep(2)
        raise ComposeError(f"not healthy after {time.monotonic() - started:.0f} s: {statuses}\n{self.logs()}")

    def logs(self, tail: int = 40) -> str:
        return self.run("logs", "--no-color", f"--tail={tail}", check=False, timeout=120).stdout[-8000:]

    def down(self) -> None:
        """Containers, networks and volumes of this project (named volumes included)."""
        self.run("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300, check=False)

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes still labelled with this project (empty after `down`)."""
        label = f"label=com.docker.compose.project={self.project}"
        found = {}
        for kind, argv in (
            ("containers", ["docker", "ps", "-aq", "--filter", label]),
            ("networks", ["docker", "network", "ls", "-q", "--filter", label]),
            ("volumes", ["docker", "volume", "ls", "-q", "--filter", label]),
        ):
            found[kind] = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.split()
        return found
