"""Configuration, read once from the environment into a typed object.

Everything else receives a `Settings`; no other module reads `os.environ`.
Every variable is listed in README.md (Configuration).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping


def _bool(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _list(value: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    # Label Studio connection (the /setup call may also hand over hostname and token)
    label_studio_url: str = ""
    label_studio_api_key: str = field(default="", repr=False)
    # HTTP server
    basic_auth_user: str = ""
    basic_auth_pass: str = field(default="", repr=False)
    log_level: str = "INFO"
    max_request_mb: float = 64.0
    # Image access
    image_allowed_hosts: tuple[str, ...] = ()
    image_max_bytes: int = 64 * 1024 * 1024
    image_max_pixels: int = 120_000_000
    image_fetch_timeout_s: float = 15.0
    image_fetch_retries: int = 2
    image_cache_dir: Path = Path("run/image-cache")
    image_cache_mb: float = 512.0
    gcs_direct_read: bool = False
    # Models
    device: str = "auto"
    # SAM backend
    sam_engine: str = "auto"
    sam_model_type: str = "vit_b"
    sam_checkpoint: str = ""
    embedding_cache_mb: float = 1024.0
    # Segmentation backend
    model_dir: Path = Path("models/segmentation")
    seg_checkpoint: str = ""
    train_every: int = 10
    train_minutes: float = 5.0
    val_fraction: float = 0.2

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        get = env.get
        return cls(
            label_studio_url=get("LABEL_STUDIO_URL", "").rstrip("/"),
            label_studio_api_key=get("LABEL_STUDIO_API_KEY", ""),
            basic_auth_user=get("BASIC_AUTH_USER", ""),
            basic_auth_pass=get("BASIC_AUTH_PASS", ""),
            log_level=get("LOG_LEVEL", "INFO").upper(),
            max_request_mb=float(get("MAX_REQUEST_MB", "64")),
            image_allowed_hosts=_list(get("IMAGE_ALLOWED_HOSTS")),
            image_max_bytes=int(float(get("IMAGE_MAX_MB", "64")) * 1024 * 1024),
            image_max_pixels=int(float(get("IMAGE_MAX_MEGAPIXELS", "120")) * 1_000_000),
            image_fetch_timeout_s=float(get("IMAGE_FETCH_TIMEOUT", "15")),
            image_fetch_retries=int(get("IMAGE_FETCH_RETRIES", "2")),
            image_cache_dir=Path(get("IMAGE_CACHE_DIR", "run/image-cache")),
            image_cache_mb=float(get("IMAGE_CACHE_MB", "512")),
            gcs_direct_read=_bool(get("GCS_DIRECT_READ"), False),
            device=get("DEVICE", "auto").lower(),
            sam_engine=get("SAM_ENGINE", "auto"),
            sam_model_type=get("SAM_MODEL_TYPE", "vit_b"),
            sam_checkpoint=get("SAM_CHECKPOINT", ""),
            embedding_cache_mb=float(get("EMBEDDING_CACHE_MB", "1024")),
            model_dir=Path(get("MODEL_DIR", "models/segmentation")),
            seg_checkpoint=get("SEG_CHECKPOINT", ""),
            train_every=int(get("TRAIN_EVERY", "10")),
            train_minutes=float(get("TRAIN_MINUTES", "5")),
            val_fraction=float(get("VAL_FRACTION", "0.2")),
        )
