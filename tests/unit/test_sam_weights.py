"""`python -m sam.weights download`: SHA-256 verification, atomic write, a clear message when offline."""

from __future__ import annotations

import hashlib
import http.server
import socket
import subprocess
import sys
import threading

import pytest

from sam.weights import CHECKPOINTS, CheckpointDownloadError, download

PAYLOAD = b"not really a checkpoint, but bytes to verify" * 1000


@pytest.fixture()
def file_server():
    """Serves PAYLOAD at /<anything> on a loopback port chosen by the OS."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/sam_vit_b_01ec64.pth"
    server.shutdown()
    server.server_close()


def closed_port_url() -> str:
    with socket.socket() as probe:  # bind then release: nothing listens there afterwards
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/sam_vit_b_01ec64.pth"


def test_official_table():
    assert CHECKPOINTS["vit_b"].url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert {c.filename for c in CHECKPOINTS.values()} == {
        "sam_vit_h_4b8939.pth",
        "sam_vit_l_0b3195.pth",
        "sam_vit_b_01ec64.pth",
    }
    assert all(len(c.sha256) == 64 for c in CHECKPOINTS.values())


def test_download_verifies_and_writes_atomically(tmp_path, file_server):
    good = hashlib.sha256(PAYLOAD).hexdigest()
    path = download("vit_b", tmp_path, url=file_server, sha256=good, progress=False)
    assert path == tmp_path / "sam_vit_b_01ec64.pth" and path.read_bytes() == PAYLOAD
    assert [p.name for p in tmp_path.iterdir()] == ["sam_vit_b_01ec64.pth"]  # no .part left
    # already present and verified: kept as is
    assert download("vit_b", tmp_path, url=closed_port_url(), sha256=good, progress=False) == path


def test_hash_mismatch_leaves_nothing(tmp_path, file_server):
    with pytest.raises(CheckpointDownloadError, match="does not match"):
        download("vit_b", tmp_path, url=file_server, progress=False)  # the official hash
    assert list(tmp_path.iterdir()) == []


def test_offline_fails_with_a_clear_message(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sam.weights",
            "download",
            "vit_b",
            "--dir",
            str(tmp_path),
            "--url",
            closed_port_url(),
            "--timeout",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "cannot download" in done.stderr and "offline" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []
