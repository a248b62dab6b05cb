"""Fixtures of the reliability suite: both backends in-process (starlette TestClient over ASGI)
with settings for tests (engines with known answers: tests/support/engines.py) and tiny models.

Tests that start real backend processes are marked `e2e` (the project's marker for backend
processes on loopback); everything here binds port 0 and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from backends.server.app import create_app
from backends.settings import Settings
from sam.model import SamBackend
from segmentation.model import SegmentationBackend
from tests.conftest import one_torch_thread_while
from tests.reliability.models import save_constant_segmentation_model


def sam_client(settings: Settings) -> TestClient:
    """A TestClient (enter it) for SamBackend; each app has its own state (its service)."""
    return TestClient(create_app(SamBackend, settings), raise_server_exceptions=False)


def segmentation_client(settings: Settings) -> TestClient:
    return TestClient(create_app(SegmentationBackend, settings), raise_server_exceptions=False)


def base_settings(tmp: Path, **fields) -> Settings:
    """Settings for an in-process backend: caches and models under `tmp`, fast failures."""
    defaults = dict(
        image_cache_dir=tmp / "image-cache",
        model_dir=tmp / "models",
        image_fetch_timeout_s=2.0,
        image_fetch_retries=0,
        embedding_cache_mb=16,
        device="cpu",
    )
    return dataclasses.replace(Settings(), **(defaults | fields))


@pytest.fixture(scope="session")
def constant_model(tmp_path_factory) -> Path:
    """A tiny segmentation version predicting "Nucleus" everywhere (SEG_CHECKPOINT)."""
    return save_constant_segmentation_model(tmp_path_factory.mktemp("seg-checkpoint"))


one_torch_thread = pytest.fixture(one_torch_thread_while, scope="module", autouse=True, name="one_torch_thread")
