"""Fetch a task's image, wherever Label Studio says it lives, and decode it to RGB pixels.

Where an image URI leads:
- ``/data/upload/...``, ``/data/local-files/?d=...`` and other relative paths: the Label Studio host,
  with its Authorization header.
- ``gs://``, ``gcs://``, ``s3://``, ``azure-blob://``: through Label Studio,
  ``GET {ls}/tasks/{task_id}/resolve/?fileuri=<urlsafe base64 of the URI>``, which answers with the
  bytes or a 303 to a presigned URL; the backend needs no cloud credentials. Optionally (GCS_DIRECT_READ)
  ``gs://`` is read directly with google-cloud-storage and the client library's credentials.
- ``http(s)://``: only the Label Studio host and IMAGE_ALLOWED_HOSTS (``host`` or ``host:port``).
  Redirects are followed by hand (at most 5), each hop checked again; a redirect issued by Label
  Studio itself may lead anywhere over http(s) (it hands out presigned storage URLs). Link-local and
  cloud metadata addresses are refused even when listed. The token goes only to Label Studio.

Fetched bytes are cached on disk under a stable identity (task id + URI without signature
parameters), so a freshly signed URL for the same object still hits the cache.
"""
from __future__ import annotations

import base64
import io
import logging
import numbers
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable
from urllib.parse import quote, unquote, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image

from backends.errors import (
    BackendError,
    BadRequest,
    ForbiddenImageSource,
    ImageUnavailable,
    LabelStudioUnavailable,
)
from backends.image_cache import ImageCache
from backends.image_decode import allow_pixels, decode_image
from backends.image_sources import (
    STORAGE_SCHEMES,
    check_source,
    display_uri,
    host_label,
    parse_host_entry,
    same_origin,
    stable_uri,
)
from backends.ls_auth import LabelStudioAuth
from backends.settings import Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
DEGRADED_TIMEOUT_S = 2.0  # the /health probe's timeout, and a fetch's while Label Studio is down
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


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


class _Retryable(Exception):
    """A failure worth another attempt (connection error, timeout, 5xx); `error` is raised at the end."""

    def __init__(self, error: BackendError):
        super().__init__(error.message)
        self.error = error


class _Unauthorized(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class ImageFetcher:
    """Fetches image bytes from Label Studio, its storages or allow-listed hosts, and decodes them.

    Thread-safe; one instance per backend process. `backoff_s` (first retry delay, doubled each time)
    is an attribute so tests can shorten it.
    """

    backoff_s = 0.25

    def __init__(self, settings: Settings, cache: ImageCache | None = None):
        self.settings = settings
        self.cache = cache if cache is not None else ImageCache(
            settings.image_cache_dir, int(settings.image_cache_mb * 1024 * 1024)
        )
        self._lock = threading.Lock()
        self._hostname: str | None = None
        self._access_token: str | None = None
        self._auth: LabelStudioAuth | None = None
        self._auth_for: tuple[str, str] | None = None
        self._local = threading.local()
        self._gcs_client = None
        self._allowed = tuple(parse_host_entry(entry) for entry in settings.image_allowed_hosts)
        # Set by check_label_studio (the /health probe): while Label Studio is known to be down,
        # fetches from it make one short attempt instead of retrying for minutes.
        self._label_studio_down = False
        allow_pixels(settings.image_max_pixels)

    # ----------------------------------------------------------------- Label Studio connection
    def configure(self, hostname: str | None = None, access_token: str | None = None) -> None:
        """Take what Label Studio's /setup sends; LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY from the
        settings win when set."""
        with self._lock:
            if hostname:
                self._hostname = hostname.strip().rstrip("/")
            if access_token:
                self._access_token = access_token.strip()

    @property
    def label_studio_url(self) -> str:
        return (self.settings.label_studio_url or self._hostname or "").rstrip("/")

    def auth(self) -> LabelStudioAuth | None:
        """The Label Studio authorization in use, or None when the URL or the key is unknown."""
        url = self.label_studio_url
        key = self.settings.label_studio_api_key or self._access_token or ""
        if not url or not key:
            return None
        with self._lock:
            if self._auth_for != (url, key):
                session = requests.Session()
                session.trust_env = False
                self._auth = LabelStudioAuth(url, key, timeout_s=self.settings.image_fetch_timeout_s, session=session)
                self._auth_for = (url, key)
            return self._auth

    def check_label_studio(self) -> bool:
        """Whether Label Studio answers its /health within ~2 s (False also when no URL is known)."""
        url = self.label_studio_url
        if not url:
            return False
        try:
            response = self._session().get(f"{url}/health", timeout=DEGRADED_TIMEOUT_S)
            response.close()
            reachable = response.status_code == 200
        except requests.RequestException:
            reachable = False
        self._label_studio_down = not reachable
        return reachable

    # ----------------------------------------------------------------- identity
    @staticmethod
    def identity(uri: str, task_id: int | None) -> str:
        """Stable cache key: ``f"{task_id}:{uri}"`` with signature query parameters (X-Goog-*,
        X-Amz-*, Signature, Expires, sig, se, sp, sv, token, ...) removed, so re-signed URLs match."""
        return f"{task_id}:{stable_uri(uri)}"

    # ----------------------------------------------------------------- fetching
    def load(self, uri: str, task_id: int | None = None) -> LoadedImage:
        """Fetch and decode: (H, W, 3) uint8 RGB pixels, EXIF orientation applied."""
        data = self.fetch_bytes(uri, task_id)  # checks uri and task_id first (BadRequest)
        identity = self.identity(uri, task_id)
        try:
            pixels = decode_image(data, self.settings.image_max_pixels, name=f"image {display_uri(uri)}")
        except ImageUnavailable:
            self.cache.discard(identity)  # never keep serving bytes that do not decode
            raise
        return LoadedImage(pixels=pixels, identity=identity)

    def fetch_bytes(self, uri: str, task_id: int | None = None) -> bytes:
        """The image's bytes (from the disk cache when present). Raises ForbiddenImageSource,
        BadRequest, ImageUnavailable or LabelStudioUnavailable with a message naming the host."""
        if not isinstance(uri, str) or not uri.strip():
            raise BadRequest(f"the task's image URI must be a non-empty string, got {type(uri).__name__}")
        if task_id is not None and not isinstance(task_id, numbers.Integral):
            raise BadRequest(f"task id must be an integer, got {type(task_id).__name__}")
        uri = uri.strip()
        identity = self.identity(uri, task_id)
        cached = self.cache.get(identity)
        if cached is not None:
            return cached
        started = time.monotonic()
        data = self._fetch_uncached(uri, task_id)
        log.debug("fetched %s (%d bytes) in %.0f ms", display_uri(uri), len(data), 1000 * (time.monotonic() - started))
        if self.cache.enabled and _looks_like_image(data):  # an error page must not be cached as the image
            self.cache.put(identity, data)
        return data

    def _fetch_uncached(self, uri: str, task_id: int | None) -> bytes:
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
        except ValueError as error:
            raise BadRequest(f"image URI {display_uri(uri)} is not a valid URL: {error}") from None
        scheme = parts.scheme.lower()
        if scheme in STORAGE_SCHEMES:
            if scheme in ("gs", "gcs") and self.settings.gcs_direct_read:
                try:
                    return self._read_gcs(parts.netloc, unquote(parts.path.lstrip("/")), uri)
                except _DirectReadUnavailable as exc:
                    if task_id is None:
                        raise ImageUnavailable(str(exc)) from None
                    log.warning("%s; reading %s through Label Studio instead", exc, display_uri(uri))
            return self._fetch_via_label_studio(uri, task_id)
        if scheme in ("http", "https"):
            return self._get(uri, display_uri(uri))
        if scheme == "" and not parts.netloc:
            base = self.label_studio_url
            if not base:
                raise ImageUnavailable(
                    f"image {display_uri(uri)} is a Label Studio path, but the Label Studio URL is unknown: "
                    "set LABEL_STUDIO_URL (or connect the backend so /setup sends the hostname)"
                )
            return self._get(urljoin(base + "/", uri), display_uri(uri))
        raise ForbiddenImageSource(
            f"image URI scheme {scheme + ':' if scheme else '//'} is not allowed: use http(s), gs, s3, "
            "azure-blob or a Label Studio path"
        )

    def _fetch_via_label_studio(self, uri: str, task_id: int | None) -> bytes:
        if task_id is None:
            raise BadRequest(f"{display_uri(uri)} is read through Label Studio's resolve endpoint, which needs the task id")
        base = self.label_studio_url
        if not base:
            raise ImageUnavailable(
                f"{display_uri(uri)} is read through Label Studio, but the Label Studio URL is unknown: "
                "set LABEL_STUDIO_URL (or connect the backend so /setup sends the hostname)"
            )
        fileuri = base64.urlsafe_b64encode(uri.encode("utf-8")).decode("ascii")
        return self._get(f"{base}/tasks/{int(task_id)}/resolve/?fileuri={quote(fileuri)}", display_uri(uri))

    def _attempts(self) -> int:
        """How many times a transient failure is tried: 1 + IMAGE_FETCH_RETRIES."""
        return 1 + max(int(self.settings.image_fetch_retries), 0)

    def _retrying(self, attempt: Callable[[], bytes], name: str, attempts: int) -> bytes:
        """`attempt()` until it returns, at most `attempts` times; only `_Retryable` failures are
        tried again (after backoff_s, doubled each time), and the last one raises its error."""
        failures = 0
        while True:
            try:
                return attempt()
            except _Retryable as exc:
                failures += 1
                if failures >= attempts:
                    raise exc.error from None
                delay = self.backoff_s * 2 ** (failures - 1)
                log.info("fetching %s failed (%s); retry %d of %d in %.2f s", name, exc, failures, attempts - 1, delay)
                time.sleep(delay)

    def _get(self, url: str, name: str) -> bytes:
        """GET with bounded retries (connection errors, timeouts, 429, 5xx) and one re-authorisation
        after a 401/403 from Label Studio for personal access tokens."""
        fail_fast = self._label_studio_down and self._is_label_studio(url)
        attempts = 1 if fail_fast else self._attempts()
        reauthorised = False
        while True:
            try:
                return self._retrying(lambda: self._get_once(url, name, fail_fast), name, attempts)
            except _Unauthorized as exc:
                auth = self.auth()
                if auth is not None and auth.is_pat and not reauthorised:
                    auth.on_unauthorized()
                    reauthorised = True
                    continue
                raise ImageUnavailable(
                    f"Label Studio at {self.label_studio_url} refused access to {name} (HTTP {exc.status}): "
                    + ("the API token is wrong or lacks access: check LABEL_STUDIO_API_KEY" if auth
                       else "no API token is configured: set LABEL_STUDIO_API_KEY")
                ) from None

    def _get_once(self, url: str, name: str, fail_fast: bool = False) -> bytes:
        timeout = self.settings.image_fetch_timeout_s
        if fail_fast:
            timeout = min(timeout, DEGRADED_TIMEOUT_S)
        deadline = time.monotonic() + 4 * timeout  # the whole transfer, slow drips included
        from_label_studio = False
        for _ in range(MAX_REDIRECTS + 1):
            check_source(url, self.label_studio_url, self._allowed, redirected_by_label_studio=from_label_studio)
            is_ls = self._is_label_studio(url)
            headers = {"Accept-Encoding": "identity"}  # sizes are checked on the wire: no gzip bombs
            auth = self.auth() if is_ls else None
            if auth is not None:
                headers.update(auth.headers())
            host = host_label(url)
            try:
                response = self._session().get(
                    url, headers=headers, stream=True, allow_redirects=False, timeout=(timeout, timeout)
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                kind = "timed out" if isinstance(exc, requests.Timeout) else "could not be reached"
                if is_ls:
                    raise _Retryable(LabelStudioUnavailable(
                        f"Label Studio at {host} {kind} while fetching {name}"
                    )) from None
                raise _Retryable(ImageUnavailable(f"image host {host} {kind} while fetching {name}")) from None
            except requests.RequestException as exc:
                raise ImageUnavailable(f"cannot fetch {name} from {host}: {type(exc).__name__}") from None
            with response:
                status = response.status_code
                if status in _REDIRECT_STATUSES and response.headers.get("Location"):
                    target = urljoin(url, response.headers["Location"])
                    if is_ls and urlsplit(target).path.startswith("/user/login"):
                        raise _Unauthorized(status)  # Django sends unauthenticated users to the login page
                    from_label_studio = is_ls
                    url = target
                    continue
                if 200 <= status < 300:
                    return self._read_body(response, name, host, deadline)
                if status in (401, 403) and is_ls:
                    raise _Unauthorized(status)
                if status == 429 or status >= 500:
                    raise _Retryable(ImageUnavailable(f"{host} answered HTTP {status} for {name}"))
                if status == 404:
                    raise ImageUnavailable(f"image {name} was not found (HTTP 404 from {host})")
                if status in (401, 403):
                    raise ImageUnavailable(
                        f"{host} refused access to {name} (HTTP {status}; an expired signed URL?)"
                    )
                raise ImageUnavailable(f"{host} answered HTTP {status} for {name}")
        raise ImageUnavailable(f"too many redirects (more than {MAX_REDIRECTS}) fetching {name}")

    def _read_body(self, response: requests.Response, name: str, host: str, deadline: float) -> bytes:
        limit = self.settings.image_max_bytes
        too_large = ImageUnavailable(
            f"image {name} is larger than the limit of {limit / 2**20:.1f} MiB (IMAGE_MAX_MB)"
        )
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: list[bytes] = []
        received = 0
        try:
            for chunk in response.iter_content(chunk_size=64 * 1024):
                received += len(chunk)
                if received > limit:
                    raise too_large
                if time.monotonic() > deadline:
                    raise _Retryable(ImageUnavailable(f"fetching {name} from {host} took too long"))
                chunks.append(chunk)
        except (requests.RequestException, OSError) as exc:
            raise _Retryable(ImageUnavailable(
                f"the connection to {host} broke while reading {name}: {type(exc).__name__}"
            )) from None
        return b"".join(chunks)

    # ----------------------------------------------------------------- HTTP plumbing
    def _is_label_studio(self, url: str) -> bool:
        return same_origin(url, self.label_studio_url)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxies or .netrc credentials from the environment
            self._local.session = session
        return session

    # ----------------------------------------------------------------- direct GCS
    def _read_gcs(self, bucket: str, key: str, uri: str) -> bytes:
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
        return self._retrying(lambda: self._read_gcs_once(client, bucket, key, name), name, self._attempts())

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
            raise _Retryable(ImageUnavailable(f"GCS could not be reached for {name}: {type(exc).__name__}")) from None
        except auth_exc.GoogleAuthError as exc:  # e.g. RefreshError: the key was refused
            raise ImageUnavailable(
                f"GCS did not accept the credentials for {name} ({type(exc).__name__}; check the service account)"
            ) from None
        except gexc.Forbidden:
            raise ImageUnavailable(f"GCS refused access to {name} (check the service account)") from None
        except gexc.NotFound:
            raise ImageUnavailable(f"image {name} was not found in bucket {bucket}") from None
        except (gexc.TooManyRequests, gexc.ServerError) as exc:
            raise _Retryable(ImageUnavailable(f"GCS read of {name} failed: {type(exc).__name__}")) from None
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
