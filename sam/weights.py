"""Meta's official SAM checkpoints: `python -m sam.weights download vit_b|vit_l|vit_h [--dir DIR]`.

Files come from Meta's public file server. Meta publishes no checksums; the SHA-256 values below
are the ones independent projects record for these exact files (e.g. micro-sam's model registry,
and Dockerfiles that run `sha256sum -c` on them), which agree with each other. `--sha256` verifies
against another value (for a mirror). The file is streamed to `<name>.part` beside the target,
verified, then moved into place with `os.replace`: a crash or a bad download never leaves a
truncated checkpoint under the final name.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import requests

BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything"
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Checkpoint:
    model_type: str
    filename: str
    sha256: str

    @property
    def url(self) -> str:
        return f"{BASE_URL}/{self.filename}"


CHECKPOINTS = {
    c.model_type: c
    for c in (
        Checkpoint("vit_h", "sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
        Checkpoint("vit_l", "sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
        Checkpoint("vit_b", "sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    )
}


class CheckpointDownloadError(Exception):
    """The checkpoint could not be fetched or did not verify; the message says why and what to do."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    model_type: str,
    directory: str | os.PathLike = "models/sam",
    url: str | None = None,
    sha256: str | None = None,
    timeout_s: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download (or reuse an already verified) checkpoint of `model_type`; returns its path."""
    if model_type not in CHECKPOINTS:
        raise CheckpointDownloadError(f"unknown model type {model_type!r}: expected one of {', '.join(CHECKPOINTS)}")
    checkpoint = CHECKPOINTS[model_type]
    url = url or checkpoint.url
    expected = (sha256 or checkpoint.sha256).lower()
    target = Path(directory) / checkpoint.filename
    if target.is_file() and sha256_of(target) == expected:
        _say(progress, f"{target} is already present and verified")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        digest = _stream(url, partial, timeout_s, progress)
        if digest != expected:
            raise CheckpointDownloadError(
                f"{url}: SHA-256 {digest} does not match the expected {expected}; the file was discarded"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    _say(progress, f"saved {target} (SHA-256 verified)")
    return target


def _stream(url: str, partial: Path, timeout_s: float, progress: bool) -> str:
    """GET `url` into `partial`, returning the SHA-256 of what was written."""
    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=timeout_s) as response:
            if response.status_code != 200:
                raise CheckpointDownloadError(f"{url} answered HTTP {response.status_code}")
            total = int(response.headers.get("Content-Length") or 0)
            written = 0
            with open(partial, "wb") as handle:
                for chunk in response.iter_content(CHUNK_BYTES):
                    handle.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    if progress and total:
                        print(f"\r{written / 2**20:8.1f} / {total / 2**20:.1f} MiB", end="", file=sys.stderr)
            if progress and total:
                print(file=sys.stderr)
    except requests.exceptions.RequestException as error:
        raise CheckpointDownloadError(
            f"cannot download {url}: {type(error).__name__} (offline, or the host is unreachable). "
            "Copy the checkpoint file here by other means and set SAM_CHECKPOINT to its path."
        ) from error
    return digest.hexdigest()


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sam.weights", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="download and verify an official SAM checkpoint")
    fetch.add_argument("model_type", choices=sorted(CHECKPOINTS))
    fetch.add_argument("--dir", default="models/sam", help="target folder (default: models/sam)")
    fetch.add_argument("--url", help="download from this URL instead (a mirror)")
    fetch.add_argument("--sha256", help="expected SHA-256 of the file (default: the official file's)")
    fetch.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server")
    args = parser.parse_args(argv)
    try:
        path = download(args.model_type, args.dir, url=args.url, sha256=args.sha256, timeout_s=args.timeout)
    except CheckpointDownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
