"""Configuration, read once from the environment into a typed object.

Everything else receives a `Settings`; no other module reads `os.environ`.
Every variable is listed in README.md (Configuration).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


def _bool(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _list(value: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


class SettingsError(ValueError):
    """A configuration the backend must not start with; the message names the variable to fix."""


def _count(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    """An integer variable of at least `minimum`; SettingsError naming `name` otherwise."""
    raw = env.get(name, "") or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


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
    # Work and state any client can create: each bounded (README, Operations / Limits)
    max_projects: int = 32  # projects with a model instance in memory (least recently used evicted)
    background_queue_max: int = 64  # webhook jobs and SAM prewarms waiting for a background worker
    label_config_max_kb: float = 256.0
    label_config_max_depth: int = 64
    # Image access
    image_allowed_hosts: tuple[str, ...] = ()
    image_max_bytes: int = 64 * 1024 * 1024
    image_max_pixels: int = 120_000_000
    image_fetch_timeout_s: float = 15.0
    image_fetch_retries: int = 2
    image_fetch_deadline_s: float = 0.0  # one fetch in all (connect, redirects, retries, reads); 0: 4 x timeout
    image_fetch_per_host: int = 8  # fetches in flight per image host (scheme, host, port)
    image_fetch_queue_wait_s: float = 2.0  # how long a fetch waits for its host's slot before a 503
    image_max_jpeg_scans: int = 100  # scans of one JPEG; each costs a pass over the whole image
    decode_max_inflight_pixels: int = 0  # decoded pixels held at once, all requests; 0: 2 x image_max_pixels
    decode_wait_s: float = 30.0  # how long a decode waits for that budget before a 503
    decode_concurrency: int = 2  # images decoded at the same time (each needs ~4 more bytes per pixel while decoding)
    image_cache_dir: Path = Path("run/image-cache")
    image_cache_mb: float = 512.0
    gcs_direct_read: bool = False
    # Scale-out: Redis shared by replicas (SAM embeddings, training queue); "" = one process, no Redis
    redis_url: str = field(default="", repr=False)  # may hold a password
    # Models
    device: str = "auto"
    # SAM backend
    sam_engine: str = "auto"
    sam_model_type: str = "vit_b"
    sam_checkpoint: str = ""
    embedding_cache_mb: float = 1024.0
    prewarm_max_per_request: int = 16  # embeddings one request (or one project at a time) may start
    max_prompts_per_request: int = 64  # interactive prompts (context regions x tasks) per /predict
    sam_sdpa: bool = True
    sam_compile: bool = False
    embed_batch: int = 0
    embed_batch_wait_ms: float = 5.0
    sam_output: str = "auto"  # auto | brush | polygon | both: the kind of region a prompt becomes
    sam_polygon_tolerance: float = 1.0  # pixels: how far a simplified polygon may stray from the mask
    sam_text_prompts: str = ""  # "labels": pre-annotate every label's instances by its name (SAM 3)
    sam_text_synonyms: str = ""  # "Label=phrase|phrase;Label2=phrase"
    sam_text_threshold: float = 0.5  # instance score a text prompt's result must reach
    sam_text_max_instances: int = 100  # instances per text prompt and image
    sam_shared_cache_ttl_s: float = 86400.0  # how long an embedding stays in Redis (L2) after it is computed
    sam_shared_lock_ms: int = 10_000  # one replica embeds an image; the others wait this long at most
    redis_timeout_s: float = 0.5  # Redis socket timeout (embeddings, training queue): slower counts as down
    # Segmentation backend
    model_dir: Path = Path("models/segmentation")
    seg_checkpoint: str = ""
    seg_model: str = "unet"  # model family a run trains: "unet" or "hf:<Hub id or save_pretrained folder>"
    seg_label_map: str = ""  # "Upper-clothes=Top,Pants=Trousers": pretrained model classes -> project labels
    seg_allow_hub: bool = False  # pretrained segmentation models may be downloaded from the Hugging Face Hub
    seg_min_confidence: float = 0.5  # predicted pixels below this confidence are background
    seg_min_component_px: int = 16  # predicted components smaller than this are dropped
    seg_fill_holes_px: int = 64  # holes smaller than this inside a predicted class are filled
    train_every: int = 10
    train_minutes: float = 5.0
    val_fraction: float = 0.2
    seg_max_rle_mb: float = 4.0  # brush RLE of one task's prediction; too fragmented labels are left out
    train_concurrency: int = 1  # training runs at once, all projects together
    train_queue_max: int = 8  # runs waiting for a slot; beyond it START_TRAINING gets a 429
    train_retries: int = 1  # REDIS_URL: times a run whose worker died is queued again before it counts as failed
    seg_version_poll_s: float = 2.0  # how often a project's `current` version is checked (another process may promote)
    polygon_max_vertices: int = 10_000  # per annotated polygon rasterised for training / export
    seg_refresh: bool = True  # a newly served version re-predicts the project's unlabeled tasks in Label Studio
    seg_refresh_rate: float = 2.0  # tasks per second a refresh predicts and writes, at most
    seg_refresh_max_tasks: int = 1000  # tasks one refresh predicts, at most

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        get = env.get
        return cls(
            label_studio_url=get("LABEL_STUDIO_URL", "").rstrip("/"),
            # Empty: the admin's legacy token that docker-compose.yml also hands Label Studio (compose v1
            # cannot express that default itself), else the token of the first /setup.
            label_studio_api_key=get("LABEL_STUDIO_API_KEY") or get("LABEL_STUDIO_USER_TOKEN", ""),
            basic_auth_user=get("BASIC_AUTH_USER", ""),
            basic_auth_pass=get("BASIC_AUTH_PASS", ""),
            log_level=get("LOG_LEVEL", "INFO").upper(),
            max_request_mb=float(get("MAX_REQUEST_MB", "64")),
            max_projects=_count(env, "MAX_PROJECTS", 32),
            background_queue_max=_count(env, "BACKGROUND_QUEUE_MAX", 64, minimum=0),
            label_config_max_kb=float(get("LABEL_CONFIG_MAX_KB", "256")),
            label_config_max_depth=_count(env, "LABEL_CONFIG_MAX_DEPTH", 64),
            image_allowed_hosts=_list(get("IMAGE_ALLOWED_HOSTS")),
            image_max_bytes=int(float(get("IMAGE_MAX_MB", "64")) * 1024 * 1024),
            image_max_pixels=int(float(get("IMAGE_MAX_MEGAPIXELS", "120")) * 1_000_000),
            image_fetch_timeout_s=float(get("IMAGE_FETCH_TIMEOUT", "15")),
            image_fetch_retries=int(get("IMAGE_FETCH_RETRIES", "2")),
            image_fetch_deadline_s=float(get("IMAGE_FETCH_DEADLINE", "0")),
            image_fetch_per_host=_count(env, "IMAGE_FETCH_PER_HOST", 8),
            image_fetch_queue_wait_s=float(get("IMAGE_FETCH_QUEUE_WAIT", "2")),
            image_max_jpeg_scans=_count(env, "IMAGE_MAX_JPEG_SCANS", 100),
            decode_max_inflight_pixels=int(float(get("DECODE_MAX_INFLIGHT_MEGAPIXELS", "0")) * 1_000_000),
            decode_wait_s=float(get("DECODE_WAIT_TIMEOUT", "30")),
            decode_concurrency=_count(env, "DECODE_CONCURRENCY", 2),
            image_cache_dir=Path(get("IMAGE_CACHE_DIR", "run/image-cache")),
            image_cache_mb=float(get("IMAGE_CACHE_MB", "512")),
            gcs_direct_read=_bool(get("GCS_DIRECT_READ"), False),
            redis_url=get("REDIS_URL", "").strip(),
            device=get("DEVICE", "auto").lower(),
            sam_engine=get("SAM_ENGINE", "auto"),
            sam_model_type=get("SAM_MODEL_TYPE", "vit_b"),
            sam_checkpoint=get("SAM_CHECKPOINT", ""),
            embedding_cache_mb=float(get("EMBEDDING_CACHE_MB", "1024")),
            prewarm_max_per_request=_count(env, "PREWARM_MAX_PER_REQUEST", 16, minimum=0),
            max_prompts_per_request=_count(env, "MAX_PROMPTS_PER_REQUEST", 64),
            sam_sdpa=_bool(get("SAM_SDPA"), True),
            sam_compile=_bool(get("SAM_COMPILE"), False),
            embed_batch=int(get("EMBED_BATCH", "0")),
            embed_batch_wait_ms=float(get("EMBED_BATCH_WAIT_MS", "5")),
            sam_output=get("SAM_OUTPUT", "auto").strip().lower(),
            sam_polygon_tolerance=float(get("SAM_POLYGON_TOLERANCE", "1")),
            sam_text_prompts=get("SAM_TEXT_PROMPTS", "").strip().lower(),
            sam_text_synonyms=get("SAM_TEXT_SYNONYMS", ""),
            sam_text_threshold=float(get("SAM_TEXT_THRESHOLD", "0.5")),
            sam_text_max_instances=_count(env, "SAM_TEXT_MAX_INSTANCES", 100),
            sam_shared_cache_ttl_s=float(get("SAM_SHARED_CACHE_TTL_S", "86400")),
            sam_shared_lock_ms=_count(env, "SAM_SHARED_LOCK_MS", 10_000, minimum=100),
            redis_timeout_s=float(get("REDIS_TIMEOUT_S", "0.5")),
            model_dir=Path(get("MODEL_DIR", "models/segmentation")),
            seg_checkpoint=get("SEG_CHECKPOINT", ""),
            seg_model=get("SEG_MODEL", "unet").strip(),
            seg_label_map=get("SEG_LABEL_MAP", ""),
            seg_allow_hub=_bool(get("SEG_ALLOW_HUB"), False),
            seg_min_confidence=float(get("SEG_MIN_CONFIDENCE", "0.5")),
            seg_min_component_px=_count(env, "SEG_MIN_COMPONENT_PX", 16, minimum=0),
            seg_fill_holes_px=_count(env, "SEG_FILL_HOLES_PX", 64, minimum=0),
            train_every=int(get("TRAIN_EVERY", "10")),
            train_minutes=float(get("TRAIN_MINUTES", "5")),
            val_fraction=float(get("VAL_FRACTION", "0.2")),
            seg_max_rle_mb=float(get("SEG_MAX_RLE_MB", "4")),
            train_concurrency=_count(env, "TRAIN_CONCURRENCY", 1),
            train_queue_max=_count(env, "TRAIN_QUEUE_MAX", 8, minimum=0),
            train_retries=_count(env, "TRAIN_RETRIES", 1, minimum=0),
            seg_version_poll_s=float(get("SEG_VERSION_POLL_S", "2")),
            polygon_max_vertices=_count(env, "POLYGON_MAX_VERTICES", 10_000, minimum=3),
            seg_refresh=_bool(get("SEG_REFRESH"), True),
            seg_refresh_rate=float(get("SEG_REFRESH_RATE", "2")),
            seg_refresh_max_tasks=_count(env, "SEG_REFRESH_MAX_TASKS", 1000, minimum=0),
        ).validate()

    @property
    def decode_budget_pixels(self) -> int:
        """Decoded pixels held at once: DECODE_MAX_INFLIGHT_MEGAPIXELS, or 2 x IMAGE_MAX_MEGAPIXELS when unset."""
        if self.decode_max_inflight_pixels > 0:
            return self.decode_max_inflight_pixels
        return max(2 * self.image_max_pixels, 1)

    @property
    def fetch_deadline_s(self) -> float:
        """The total deadline of one image fetch: IMAGE_FETCH_DEADLINE, or 4 x IMAGE_FETCH_TIMEOUT when unset."""
        return self.image_fetch_deadline_s if self.image_fetch_deadline_s > 0 else 4 * self.image_fetch_timeout_s

    def validate(self) -> Settings:
        """Refuse configurations that would run unsafely; returns self. Raises SettingsError.

        Basic auth is all or nothing: a password without a user used to leave auth off, and a user
        without a password accepted an empty one.
        """
        if self.basic_auth_pass and not self.basic_auth_user:
            raise SettingsError(
                "BASIC_AUTH_PASS is set but BASIC_AUTH_USER is empty: basic auth would be off. "
                "Set both to require basic auth, or unset both."
            )
        if self.basic_auth_user and not self.basic_auth_pass:
            raise SettingsError(
                "BASIC_AUTH_USER is set but BASIC_AUTH_PASS is empty: an empty password would be accepted. "
                "Set BASIC_AUTH_PASS too, or unset BASIC_AUTH_USER."
            )
        if self.label_config_max_kb <= 0:
            raise SettingsError(f"LABEL_CONFIG_MAX_KB={self.label_config_max_kb} must be above 0")
        if not 0 < self.seg_refresh_rate <= 1000:  # also refuses NaN
            raise SettingsError(f"SEG_REFRESH_RATE={self.seg_refresh_rate} must be above 0 and at most 1000 tasks/s")
        self._validate_shared_cache()
        if not 0 <= self.seg_version_poll_s <= 3600:
            raise SettingsError(f"SEG_VERSION_POLL_S={self.seg_version_poll_s} must be between 0 and 3600 seconds")
        if self.train_retries > 10:
            raise SettingsError(f"TRAIN_RETRIES={self.train_retries} must be at most 10")
        if self.seg_model != "unet" and not (self.seg_model.startswith("hf:") and self.seg_model[3:].strip()):
            raise SettingsError(f"SEG_MODEL={self.seg_model!r}: expected unet or hf:<Hub id or save_pretrained folder>")
        if not 0 <= self.seg_min_confidence <= 1:  # also refuses NaN
            raise SettingsError(f"SEG_MIN_CONFIDENCE={self.seg_min_confidence} must be between 0 and 1")
        for entry in filter(None, (part.strip() for part in self.seg_label_map.split(","))):
            model_class, _, label = (side.strip() for side in entry.partition("="))
            if not model_class or not label:
                raise SettingsError(f"SEG_LABEL_MAP entry {entry!r} is not model_class=project_label")
        return self

    def _validate_shared_cache(self) -> None:
        """REDIS_URL (never echoed: it may hold a password) and the SAM shared-cache timings."""
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("REDIS_URL must start with redis://, rediss:// or unix://")
        if not 0 < self.sam_shared_cache_ttl_s <= 30 * 86400:
            raise SettingsError(
                f"SAM_SHARED_CACHE_TTL_S={self.sam_shared_cache_ttl_s} must be above 0 and at most 30 days"
            )
        if self.sam_shared_lock_ms > 600_000:
            raise SettingsError(f"SAM_SHARED_LOCK_MS={self.sam_shared_lock_ms} must be at most 600000 (10 minutes)")
        if not 0 < self.redis_timeout_s <= 30:
            raise SettingsError(f"REDIS_TIMEOUT_S={self.redis_timeout_s} must be above 0 and at most 30")
