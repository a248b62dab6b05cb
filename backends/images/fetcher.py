"""Fetch a task's image, wherever Label Studio says it lives, and decode it to RGB pixels.

Where an image URI leads:
- ``/data/upload/...``, ``/data/local-files/?d=...`` and other relative paths: the Label Studio host,
  with its Authorization header.
- ``gs://``, ``gcs://``, ``s3://``, ``azure-blob://``: through Label Studio,
  ``GET {ls}/tasks/{task_id}/resolve/?fileuri=<urlsafe base64 of the URI>``, which answers with the
  bytes or a 303 to a presigned URL; the backend needs no cloud credentials. Optionally (GCS_DIRECT_READ)
  ``gs://`` is read directly with google-cloud-storage and the client library's credentials.
- ``http(s)://``: only the Label Studio host and IMAGE_ALLOWED_HOSTS (``host`` or ``host:port``);
  a redirect issued by Label Studio itself may lead anywhere over http(s) (it hands out presigned
  storage URLs). Link-local and cloud metadata addresses are refused even when listed.

Every http(s) download goes through the one Label Studio client
(backends/label_studio/client.py): it knows where Label Studio is, attaches the token only to its
origin, checks every URL and redirect hop against IMAGE_ALLOWED_HOSTS, and bounds each download
(IMAGE_FETCH_DEADLINE in total, IMAGE_FETCH_PER_HOST at once, IMAGE_MAX_MB). This module decides
which URL an image URI leads to, caches the bytes and decodes them.

Fetched bytes are cached on disk under a stable identity (task id + URI without signature
parameters), so a freshly signed URL for the same object still hits the cache; for Label Studio
paths and storage URIs the key also names the Label Studio origin the bytes came through.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import numbers
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image

from backends.errors import BadRequest, ForbiddenImageSource, ImageUnavailable
from backends.images.decode import allow_pixels, decode_image, header_pixels
from backends.images.disk_cache import ImageCache
from backends.images.fetch_guard import Deadline, deadline_scope
from backends.images.pixel_budget import PixelBudget
from backends.images.retries import FIRST_BACKOFF_S, Retryable, retrying
from backends.images.sources import STORAGE_SCHEMES, display_uri, stable_uri
from backends.label_studio.client import LabelStudioClient
from backends.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image: `pixels` (H, W, 3) uint8 RGB with EXIF orientation applied (row 0 = top as shown
    in Label Studio); `identity` the stable cache key from `ImageFetcher.identity`."""

    pixels: np.ndarray
    identity: str

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


class ImageFetcher:
    """Fetches image bytes from Label Studio, its storages or allow-listed hosts, and decodes them.

    Thread-safe; one instance per backend process. Downloads go through `label_studio` (the server
    hands in its one client; a fetcher built alone, in a script or a test, makes its own from the
    same settings). `backoff_s` (first retry delay of a direct GCS read, doubled each time) is an
    attribute so tests can shorten it; downloads use the client's.
    """

    def __init__(
        self, settings: Settings, label_studio: LabelStudioClient | None = None, cache: ImageCache | None = None
    ):
        self.settings = settings
        self.label_studio = label_studio if label_studio is not None else LabelStudioClient(settings)
        self.backoff_s = FIRST_BACKOFF_S
        self.cache = (
            cache
            if cache is not None
            else ImageCache(settings.image_cache_dir, int(settings.image_cache_mb * 1024 * 1024))
        )
        self._lock = threading.Lock()
        self._gcs_client = None
        allow_pixels(settings.image_max_pixels)
        self.pixel_budget = PixelBudget(
            settings.decode_budget_pixels, settings.decode_wait_s, settings.decode_concurrency
        )

    # ----------------------------------------------------------------- identity
    @staticmethod
    def identity(uri: str, task_id: int | None) -> str:
        """Stable cache key: ``f"{task_id}:{uri}"`` with signature query parameters (X-Goog-*,
        X-Amz-*, Signature, Expires, sig, se, sp, sv, token, ...) removed, so re-signed URLs match."""
        return f"{task_id}:{stable_uri(uri)}"

    def cache_key(self, uri: str, task_id: int | None) -> str:
        """The disk cache key: the identity, plus the Label Studio origin the bytes come through for
        Label Studio paths and storage URIs (an http(s) URI names its own origin), so bytes served by
        one origin are never served for another, after a restart either."""
        identity = self.identity(uri, task_id)
        scheme = uri.partition(":")[0].lower() if ":" in uri.partition("/")[0] else ""
        if scheme in ("http", "https") or (scheme in ("gs", "gcs") and self.settings.gcs_direct_read):
            return identity
        label_studio = self.label_studio.target()
        via = "unknown" if label_studio is None else "{}://{}:{}".format(*label_studio.origin)
        return f"{identity} via {via}"

    # ----------------------------------------------------------------- fetching
    def load(self, uri: str, task_id: int | None = None) -> LoadedImage:
        """Fetch and decode: (H, W, 3) uint8 RGB pixels, EXIF orientation applied. The decode holds
        its pixels in the process's decode budget only while decoding; use `loaded` to hold them
        for as long as the pixels are in use."""
        with self.loaded(uri, task_id) as image:
            return image

    @contextlib.contextmanager
    def loaded(self, uri: str, task_id: int | None = None) -> Iterator[LoadedImage]:
        """Fetch and decode (as `load`), holding the image's pixel count in the decode budget
        (DECODE_MAX_INFLIGHT_MEGAPIXELS) until the block ends; at most DECODE_CONCURRENCY images
        are decoded at once. Raises Overloaded (503) when either stays full for DECODE_WAIT_TIMEOUT."""
        data = self.fetch_bytes(uri, task_id)  # checks uri and task_id first (BadRequest)
        uri = uri.strip()
        name = f"image {display_uri(uri)}"
        pixels = header_pixels(data)
        with self.pixel_budget.reserve(pixels if pixels <= self.settings.image_max_pixels else 0, name):
            try:
                with self.pixel_budget.decoding(name):
                    decoded = decode_image(
                        data,
                        self.settings.image_max_pixels,
                        name=name,
                        max_jpeg_scans=self.settings.image_max_jpeg_scans,
                    )
            except ImageUnavailable:
                self.cache.discard(self.cache_key(uri, task_id))  # never keep serving bytes that do not decode
                raise
            del data
            yield LoadedImage(pixels=decoded, identity=self.identity(uri, task_id))

    def fetch_bytes(self, uri: str, task_id: int | None = None) -> bytes:
        """The image's bytes (from the disk cache when present). Raises ForbiddenImageSource,
        BadRequest, ImageUnavailable or LabelStudioUnavailable with a message naming the host, and
        ImageHostBusy (503) when its host already has IMAGE_FETCH_PER_HOST fetches in flight."""
        if not isinstance(uri, str) or not uri.strip():
            raise BadRequest(f"the task's image URI must be a non-empty string, got {type(uri).__name__}")
        if task_id is not None and not isinstance(task_id, numbers.Integral):
            raise BadRequest(f"task id must be an integer, got {type(task_id).__name__}")
        uri = uri.strip()
        key = self.cache_key(uri, task_id)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        started = time.monotonic()
        with deadline_scope(self.settings.fetch_deadline_s) as deadline:
            data = self._fetch_uncached(uri, task_id, deadline)
        log.debug("fetched %s (%d bytes) in %.0f ms", display_uri(uri), len(data), 1000 * (time.monotonic() - started))
        if self.cache.enabled and _looks_like_image(data):  # an error page must not be cached as the image
            self.cache.put(key, data)
        return data

    def _fetch_uncached(self, uri: str, task_id: int | None, deadline: Deadline) -> bytes:
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
        except ValueError as error:
            raise BadRequest(f"image URI {display_uri(uri)} is not a valid URL: {error}") from None
        scheme = parts.scheme.lower()
        if scheme in STORAGE_SCHEMES:
            if scheme in ("gs", "gcs") and self.settings.gcs_direct_read:
                try:
                    return self._read_gcs(parts.netloc, unquote(parts.path.lstrip("/")), uri, deadline)
                except _DirectReadUnavailable as exc:
                    if task_id is None:
                        raise ImageUnavailable(str(exc)) from None
                    log.warning("%s; reading %s through Label Studio instead", exc, display_uri(uri))
            return self._fetch_via_label_studio(uri, task_id, deadline)
        if scheme in ("http", "https"):
            return self.label_studio.download(uri, display_uri(uri), deadline)
        if scheme == "" and not parts.netloc:
            base = self.label_studio.url
            if not base:
                raise ImageUnavailable(
                    f"image {display_uri(uri)} is a Label Studio path, but the Label Studio URL is unknown: "
                    "set LABEL_STUDIO_URL (or connect the backend so /setup sends the hostname)"
                )
            return self.label_studio.download(urljoin(base + "/", uri), display_uri(uri), deadline)
        raise ForbiddenImageSource(
            f"image URI scheme {scheme + ':' if scheme else '//'} is not allowed: use http(s), gs, s3, "
            "azure-blob or a Label Studio path"
        )

    def _fetch_via_label_studio(self, uri: str, task_id: int | None, deadline: Deadline) -> bytes:
        if task_id is None:
            raise BadRequest(
                f"{display_uri(uri)} is read through Label Studio's resolve endpoint, which needs the task id"
            )
        base = self.label_studio.url
        if not base:
            raise ImageUnavailable(
                f"{display_uri(uri)} is read through Label Studio, but the Label Studio URL is unknown: "
                "set LABEL_STUDIO_URL (or connect the backend so /setup sends the hostname)"
            )
        fileuri = base64.urlsafe_b64encode(uri.encode("utf-8")).decode("ascii")
        return self.label_studio.download(
            f"{base}/tasks/{int(task_id)}/resolve/?fileuri={quote(fileuri)}", display_uri(uri), deadline
        )

    def _attempts(self) -> int:
        """How many times a transient failure is tried: 1 + IMAGE_FETCH_RETRIES."""
        return 1 + max(int(self.settings.image_fetch_retries), 0)

    # ----------------------------------------------------------------- direct GCS
    def _read_gcs(self, bucket: str, key: str, uri: str, deadline: Deadline) -> bytes:
        """Read gs://bucket/key with google-cloud-storage (credentials from ADC, or the emulator named
        by STORAGE_EMULATOR_HOST, both handled by the client library).

        Each call to Google is bounded by IMAGE_FETCH_TIMEOUT and tried 1 + IMAGE_FETCH_RETRIES times
        by our own loop: the library's default retry (a 120 s deadline) is switched off, so an
        unreachable Google fails in seconds, not minutes.
        """
        try:
            from google.auth.exceptions import DefaultCredentialsError
            from google.cloud import storage
        except ImportError as exc:
            raise _DirectReadUnavailable(f"direct GCS read needs google-cloud-storage ({exc})") from None
        with self._lock:
            if self._gcs_client is None:
                try:
                    self._gcs_client = storage.Client()
                except DefaultCredentialsError:
                    raise _DirectReadUnavailable("direct GCS read has no credentials (GCS_DIRECT_READ)") from None
                except OSError as exc:  # e.g. no project could be determined
                    raise _DirectReadUnavailable(f"direct GCS read has no storage client ({exc})") from None
            client = self._gcs_client
        name = display_uri(uri)
        return retrying(
            lambda: self._read_gcs_once(client, bucket, key, name), name, self._attempts(), deadline, self.backoff_s
        )

    def _read_gcs_once(self, client, bucket: str, key: str, name: str) -> bytes:
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc

        timeout = self.settings.image_fetch_timeout_s
        try:
            blob = client.bucket(bucket).get_blob(key, timeout=timeout, retry=None)
            if blob is None:
                raise ImageUnavailable(f"image {name} was not found in bucket {bucket}")
            if blob.size is not None and blob.size > self.settings.image_max_bytes:
                raise ImageUnavailable(
                    f"image {name} is larger than the limit of "
                    f"{self.settings.image_max_bytes / 2**20:.1f} MiB (IMAGE_MAX_MB)"
                )
            return blob.download_as_bytes(timeout=timeout, retry=None)
        except auth_exc.DefaultCredentialsError:
            raise _DirectReadUnavailable("direct GCS read has no credentials (GCS_DIRECT_READ)") from None
        except (auth_exc.TransportError, requests.ConnectionError, requests.Timeout) as exc:
            raise Retryable(ImageUnavailable(f"GCS could not be reached for {name}: {type(exc).__name__}")) from None
        except auth_exc.GoogleAuthError as exc:  # e.g. RefreshError: the key was refused
            raise ImageUnavailable(
                f"GCS did not accept the credentials for {name} ({type(exc).__name__}; check the service account)"
            ) from None
        except gexc.Forbidden:
            raise ImageUnavailable(f"GCS refused access to {name} (check the service account)") from None
        except gexc.NotFound:
            raise ImageUnavailable(f"image {name} was not found in bucket {bucket}") from None
        except (gexc.TooManyRequests, gexc.ServerError) as exc:
            raise Retryable(ImageUnavailable(f"GCS read of {name} failed: {type(exc).__name__}")) from None
        except gexc.GoogleAPIError as exc:
            raise ImageUnavailable(f"GCS read of {name} failed: {type(exc).__name__}") from None
        except requests.RequestException as exc:
            raise ImageUnavailable(f"GCS could not be reached for {name}: {type(exc).__name__}") from None


class _DirectReadUnavailable(Exception):
    pass


def _looks_like_image(data: bytes) -> bool:
    """Cheap check (header only) that PIL recognises the bytes as an image."""
    if not data:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)):
                return True
    except Exception:  # anything PIL cannot identify (or refuses) is not worth caching
        return False
