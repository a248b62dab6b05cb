"""`python -m devstack.demo start|stop|status`: the whole stack on loopback, for `make demo`.

start: fake-gcs-server, Label Studio and both backends; demo images and a metadata manifest in a
source bucket; then `sdk_scripts.setup_project` and `sdk_scripts.import_gcs`; prints the URL and
login. Ports: 4443, 8080, 7070 and 9090 when free, otherwise free ones. Data under run/demo/
(kept between runs), logs under run/logs/, what is running in run/demo.json; `stop` stops exactly
that.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from devstack.backends import start_backend
from devstack.demo_images import demo_dataset, png_bytes
from devstack.gcs import ensure_bucket, start_fake_gcs, upload_objects
from devstack.label_studio import start_label_studio
from devstack.processes import (
    REPO_ROOT,
    RUN_DIR,
    ManagedProcess,
    StartupError,
    child_env,
    free_port,
    group_alive,
    preferred_port,
    stop_group,
)

SOURCE_BUCKET = "demo-source"
TARGET_BUCKET = "demo-target"
PROJECT_TITLE = "Demo: nuclei and cells"


DEFAULT_PORTS = {"fake-gcs-server": 4443, "label-studio": 8080, "segmentation": 7070, "sam": 9090}


@dataclass(frozen=True)
class DemoLayout:
    """Where a demo keeps its state, data and logs, and whether it tries the default ports."""

    run_dir: Path = RUN_DIR
    default_ports: bool = True

    @property
    def state_file(self) -> Path:
        return self.run_dir / "demo.json"

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "demo"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def port(self, service: str) -> int:
        return preferred_port(DEFAULT_PORTS[service]) if self.default_ports else free_port()


# ------------------------------------------------------------------ state file
def _service(name: str, process: ManagedProcess, url: str) -> dict:
    return {
        "name": name,
        "pid": process.pid,
        "url": url,
        "log": str(process.log_path),
        "cmdline": _cmdline(process.pid),
    }


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _is_ours(service: dict) -> bool:
    """The recorded pid still runs the recorded command as a group leader (not a reused pid)."""
    pid = int(service["pid"])
    if not group_alive(pid):
        return False
    try:
        if os.getpgid(pid) != pid:
            return False
    except ProcessLookupError:
        return False
    return not service.get("cmdline") or _cmdline(pid) == service["cmdline"]


def load_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def save_state(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.chmod(0o600)  # holds the local admin password
    tmp.replace(path)


# ------------------------------------------------------------------ commands
def stop(layout: DemoLayout = DemoLayout()) -> int:
    state_path = layout.state_file
    state = load_state(state_path)
    if not state:
        print("demo: nothing to stop (no run/demo.json)")
        return 0
    for service in reversed(state.get("services", [])):
        if _is_ours(service):
            stop_group(int(service["pid"]))
            print(f"stopped {service['name']} (pid {service['pid']})")
        else:
            print(f"{service['name']} (pid {service['pid']}) was not running")
    state_path.unlink(missing_ok=True)
    return 0


def status(layout: DemoLayout = DemoLayout()) -> int:
    """Print each service; exit code 0 when all run, 1 otherwise."""
    state = load_state(layout.state_file)
    if not state:
        print("demo: not running")
        return 1
    running = [_is_ours(service) for service in state["services"]]
    for service, alive in zip(state["services"], running, strict=True):
        print(
            f"{service['name']:<16} {'running' if alive else 'STOPPED':<8} {service['url']:<26} log: {service['log']}"
        )
    if all(running) and "label_studio" in state:
        _print_login(state)
    return 0 if all(running) else 1


def _print_login(state: dict) -> None:
    login = state["label_studio"]
    print(f"\nLabel Studio: {login['url']}  (project: {PROJECT_TITLE!r})")
    print(f"login: {login['username']}  password: {login['password']}")
    print(f"API token (legacy): {login['token']}")
    print("stop with: make stop")


def _run_script(module: str, args: Sequence[str], env: dict[str, str], log_path: Path) -> None:
    """Run `python -m module args` (one of the SDK scripts), output to the terminal and the log."""
    print(f"$ python -m {module} {shlex.join(args)}")
    result = subprocess.run(
        [sys.executable, "-m", module, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    with open(log_path, "a") as log:
        log.write(result.stdout + result.stderr)
    print(result.stdout.rstrip())
    if result.returncode != 0:
        raise StartupError(f"{module} failed with code {result.returncode}:\n{result.stderr[-3000:]}")


def start(layout: DemoLayout = DemoLayout()) -> int:
    state_path = layout.state_file
    state = load_state(state_path)
    if state:
        if all(_is_ours(service) for service in state["services"]):
            print("demo: already running")
            _print_login(state)
            return 0
        print("demo: some services of the last run are gone; restarting them all")
        stop(layout)

    state = {"services": []}
    began = time.monotonic()
    try:
        _start_services(layout, state)
    except BaseException as error:
        # Leave nothing running behind a failed (or interrupted) start.
        for service in reversed(state["services"]):
            if _is_ours(service):
                stop_group(int(service["pid"]))
        state_path.unlink(missing_ok=True)
        if not isinstance(error, (StartupError, OSError, RuntimeError)):
            raise
        print(f"demo: start failed: {error}", file=sys.stderr)
        return 1
    print(f"\nstarted in {time.monotonic() - began:.0f} s; logs in {layout.log_dir}")
    _print_login(state)
    return 0


def _start_services(layout: DemoLayout, state: dict) -> None:
    """Start everything, recording each service in `state` (and run/demo.json) as it comes up."""
    data_dir, log_dir = layout.data_dir, layout.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)

    def record(name: str, process: ManagedProcess, url: str) -> None:
        state["services"].append(_service(name, process, url))
        save_state(state, layout.state_file)
        print(f"{name:<17} {url}")

    gcs = start_fake_gcs(data_dir / "gcs", log_dir / "fake-gcs-server.log", port=layout.port("fake-gcs-server"))
    record("fake-gcs-server", gcs.process, gcs.url)

    label_studio = start_label_studio(
        data_dir / "label-studio",
        log_dir / "label-studio.log",
        port=layout.port("label-studio"),
        gcs_url=gcs.url,
    )
    state["label_studio"] = {
        "url": label_studio.url,
        "username": label_studio.username,
        "password": label_studio.password,
        "token": label_studio.token,
    }
    record("label-studio", label_studio.process, label_studio.url)

    backend_env = {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "MODEL_DIR": str(data_dir / "models" / "segmentation"),
        "IMAGE_CACHE_DIR": str(data_dir / "image-cache"),
    }
    backends = {}
    for name in ("segmentation", "sam"):
        backends[name] = start_backend(name, backend_env, log_dir / f"{name}.log", port=layout.port(name))
        record(name, backends[name].process, backends[name].url)

    images, rows = demo_dataset()
    client = gcs.client()
    ensure_bucket(client, TARGET_BUCKET)
    upload_objects(client, SOURCE_BUCKET, {f"images/{name}": png_bytes(image) for name, image in images.items()})
    manifest = "".join(json.dumps(row) + "\n" for row in rows).encode()
    upload_objects(client, SOURCE_BUCKET, {"manifest.jsonl": manifest})
    print(f"uploaded {len(images)} images and manifest.jsonl to gs://{SOURCE_BUCKET}")

    script_env = child_env(
        {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.token,
            "STORAGE_EMULATOR_HOST": gcs.url,
        },
        drop=("GOOGLE_APPLICATION_CREDENTIALS",),
    )
    scripts_log = log_dir / "sdk-scripts.log"
    _run_script(
        "sdk_scripts.setup_project",
        [
            "--title",
            PROJECT_TITLE,
            "--source",
            f"gs://{SOURCE_BUCKET}/images",
            "--target",
            f"gs://{TARGET_BUCKET}/annotations",
            "--seg-url",
            backends["segmentation"].url,
            "--sam-url",
            backends["sam"].url,
            "--no-progress",
        ],
        script_env,
        scripts_log,
    )
    _run_script(
        "sdk_scripts.import_gcs",
        [
            "--project",
            PROJECT_TITLE,
            "--source",
            f"gs://{SOURCE_BUCKET}/images",
            "--manifest",
            f"gs://{SOURCE_BUCKET}/manifest.jsonl",
            "--no-progress",
        ],
        script_env,
        scripts_log,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.demo",
        description="Run the demo stack on loopback: fake-gcs-server, Label Studio, the segmentation "
        "and SAM backends, with demo images imported from a local GCS bucket.",
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=RUN_DIR,
        help="state (demo.json), data (demo/) and logs (logs/) go here (default: run/)",
    )
    parser.add_argument(
        "--any-ports", action="store_true", help="use free ports instead of trying 4443, 8080, 7070 and 9090 first"
    )
    args = parser.parse_args(argv)
    layout = DemoLayout(run_dir=args.run_dir.resolve(), default_ports=not args.any_ports)
    return {"start": start, "stop": stop, "status": status}[args.command](layout)


if __name__ == "__main__":
    sys.exit(main())
