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
  cloud metadata addresses are refused even when listed.

Every URL is parsed once (`image_sources.parse_fetch_url`); the allow-list, the metadata block, the
token decision and the connection all use that one parse, and URLs that parsers read differently
(backslashes, control characters, user@) are refused. The token is attached in one place
(`_auth_headers_for`), and only when scheme, host and port all equal the Label Studio URL's.

Where Label Studio is: LABEL_STUDIO_URL, else the hostname of the first /setup (trust on first use:
a later /setup naming another origin is refused, counted and shown in /health).

Each fetch runs under a total deadline (IMAGE_FETCH_DEADLINE: connect, redirects, retries and every
read together, enforced on the socket) and at most IMAGE_FETCH_PER_HOST fetches per host run at
once (backends/images/fetch_guard.py), so a slow host cannot hold the worker threads.

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
from dataclasses import dataclass
from typing import Callable, Iterator
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
from backends.images.fetch_guard import Deadline, GuardedAdapter, HostSlots, deadline_scope
from backends.images.disk_cache import ImageCache
from backends.images.decode import allow_pixels, decode_image, header_pixels
from backends.images.sources import (
    STORAGE_SCHEMES,
    FetchTarget,
    check_source,
    display_origin,
    display_uri,
    parse_fetch_url,
    parse_host_entry,
    stable_uri,
    userinfo_of,
)
from backends.label_studio.auth import LabelStudioAuth
from backends.images.pixel_budget import PixelBudget
from backends.settings import Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
DEGRADED_TIMEOUT_S = 2.0  # the /health probe's timeout, and a fetch's while Label Studio is down
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_LOCAL_FILES_PATH = "/data/local-files"


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
    """Label Studio answered 401/403 (or sent us to its login page) for `path`."""

    def __init__(self, status: int, path: str = ""):
        super().__init__(status)
        self.status = status
        self.path = path


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
        self._hostname: str | None = None  # from the first /setup, when LABEL_STUDIO_URL is unset
        self._access_token: str | None = None
        self._refused_hostnames = 0
        self._refused_tokens = 0
        self._said_hostname_ignored = False
        self._auth: LabelStudioAuth | None = None
        self._auth_for: tuple[str, str] | None = None
        self._ls_parsed: tuple[str, FetchTarget | None] = ("", None)
        self._local = threading.local()
        self._gcs_client = None
        self._allowed = tuple(parse_host_entry(entry) for entry in settings.image_allowed_hosts)
        self._slots = HostSlots(settings.image_fetch_per_host, settings.image_fetch_queue_wait_s)
        # Set by check_label_studio (the /health probe): while Label Studio is known to be down,
        # fetches from it make one short attempt instead of retrying for minutes.
        self._label_studio_down = False
        allow_pixels(settings.image_max_pixels)
        self.pixel_budget = PixelBudget(settings.decode_budget_pixels, settings.decode_wait_s,
                                        settings.decode_concurrency)

    # ----------------------------------------------------------------- Label Studio connection
    def configure(self, hostname: str | None = None, access_token: str | None = None) -> None:
        """Take what Label Studio's /setup sends, as far as this process already trusts its sender.

        - hostname: ignored when LABEL_STUDIO_URL is set. Otherwise the first valid http(s) one is
          trusted for the life of the process (trust on first use); a later one naming another
          origin (scheme, host, port) is refused: counted, logged, shown in /health.
        - access_token: ignored when LABEL_STUDIO_API_KEY is set. The first one is taken; a
          different one later only from a /setup whose hostname has Label Studio's origin.
        """
        offered = self._setup_origin(hostname)
        with self._lock:
            self._accept_hostname(hostname, offered)
            self._accept_token(access_token, offered)

    def _setup_origin(self, hostname: str | None) -> FetchTarget | None:
        if not hostname or not hostname.strip():
            return None
        try:
            return parse_fetch_url(hostname.strip())
        except ForbiddenImageSource as error:
            log.warning("/setup sent a Label Studio hostname that is not a plain http(s) URL (%s); ignored", error.message)
            with self._lock:
                self._refused_hostnames += 1
            return None

    def _accept_hostname(self, hostname: str | None, offered: FetchTarget | None) -> None:
        if offered is None:
            return
        shown = display_origin(hostname)
        if self.settings.label_studio_url:
            if not self._said_hostname_ignored:
                self._said_hostname_ignored = True
                log.info("/setup hostname %s is not used: LABEL_STUDIO_URL (%s) is set",
                         shown, display_origin(self.settings.label_studio_url))
            return
        if self._hostname is None:
            self._hostname = hostname.strip().rstrip("/")
            log.warning("trusting Label Studio at %s, the hostname of the first /setup, for the life of this "
                        "process; production sets LABEL_STUDIO_URL (and basic auth)", shown)
            return
        trusted = self._label_studio_target()
        if trusted is None or offered.origin != trusted.origin:
            self._refused_hostnames += 1
            log.warning("/setup asked to move Label Studio from %s to %s: refused (the first /setup's hostname is "
                        "kept; set LABEL_STUDIO_URL to choose)", display_origin(self._hostname), shown)

    def _accept_token(self, access_token: str | None, offered: FetchTarget | None) -> None:
        token = (access_token or "").strip()
        if not token or self.settings.label_studio_api_key or token == self._access_token:
            return
        if self._access_token is None:  # trust on first use, like the hostname
            self._access_token = token
            return
        trusted = self._label_studio_target()
        if offered is not None and trusted is not None and offered.origin == trusted.origin:
            self._access_token = token
            return
        self._refused_tokens += 1
        log.warning("/setup sent a different access token with a hostname that is not Label Studio's: refused "
                    "(the first one is kept; set LABEL_STUDIO_API_KEY to choose)")

    def setup_report(self) -> dict:
        """For /health: where the Label Studio URL comes from and how many /setup values were refused."""
        source = "LABEL_STUDIO_URL" if self.settings.label_studio_url else "first /setup" if self._hostname else "unknown"
        return {"url_from": source, "refused_hostnames": self._refused_hostnames,
                "refused_tokens": self._refused_tokens}

    @property
    def label_studio_url(self) -> str:
        return (self.settings.label_studio_url or self._hostname or "").rstrip("/")

    def _label_studio_target(self) -> FetchTarget | None:
        """The Label Studio URL parsed like every fetched URL (its own user:password allowed); None
        when unknown or unusable."""
        url = self.label_studio_url
        cached_for, target = self._ls_parsed
        if url != cached_for:
            try:
                target = parse_fetch_url(url, allowed_userinfo=userinfo_of(url)) if url else None
            except ForbiddenImageSource as error:
                log.error("the Label Studio URL is not usable (%s): set LABEL_STUDIO_URL to http(s)://host:port",
                          error.message)
                target = None
            self._ls_parsed = (url, target)
        return target

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

    def _auth_headers_for(self, target: FetchTarget) -> dict[str, str]:
        """The Authorization header for `target`: only when its scheme, host and port all equal the
        Label Studio URL's. The one place a token is attached to an outgoing request."""
        label_studio = self._label_studio_target()
        if label_studio is None or target.origin != label_studio.origin:
            return {}
        auth = self.auth()
        return auth.headers() if auth is not None else {}

    def label_studio_get(self, path: str, params: dict | None = None, timeout_s: float = 120.0) -> requests.Response:
        """GET a Label Studio API path (``/api/...``) with its Authorization header; no redirects are
        followed (a token never leaves the Label Studio origin). Raises LabelStudioUnavailable when
        the URL or key is unknown or Label Studio does not answer."""
        base = self.label_studio_url
        if not base or self.auth() is None:
            raise LabelStudioUnavailable(
                "cannot reach the Label Studio API: its URL or API key is unknown "
                "(set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or connect the backend in Label Studio)")
        target = self._target(f"{base}{path}")
        headers = self._auth_headers_for(target)
        if not headers:
            raise ForbiddenImageSource(f"GET {path} would leave the Label Studio origin: refused")
        try:
            return self._session().get(target.url, params=params, headers=headers, timeout=timeout_s,
                                       allow_redirects=False)
        except requests.RequestException as error:
            raise LabelStudioUnavailable(f"Label Studio did not answer GET {path}: {type(error).__name__}") from None

    def check_label_studio(self) -> bool:
        """Whether Label Studio answers its /health within ~2 s (False also when no URL is known)."""
        url = self.label_studio_url
        if not url or self._label_studio_target() is None:
            return False
        try:
            target = self._target(f"{url}/health")
            response = self._session().get(target.url, timeout=DEGRADED_TIMEOUT_S, allow_redirects=False)
            response.close()
            reachable = response.status_code == 200
        except (requests.RequestException, ForbiddenImageSource):
            reachable = False
        self._label_studio_down = not reachable
        return reachable

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
        label_studio = self._label_studio_target()
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
                    decoded = decode_image(data, self.settings.image_max_pixels, name=name,
                                           max_jpeg_scans=self.settings.image_max_jpeg_scans)
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
            return self._get(uri, display_uri(uri), deadline)
        if scheme == "" and not parts.netloc:
            base = self.label_studio_url
            if not base:
                raise ImageUnavailable(
                    f"image {display_uri(uri)} is a Label Studio path, but the Label Studio URL is unknown: "
                    "set LABEL_STUDIO_URL (or connect the backend so /setup sends the hostname)"
                )
            return self._get(urljoin(base + "/", uri), display_uri(uri), deadline)
        raise ForbiddenImageSource(
            f"image URI scheme {scheme + ':' if scheme else '//'} is not allowed: use http(s), gs, s3, "
            "azure-blob or a Label Studio path"
        )

    def _fetch_via_label_studio(self, uri: str, task_id: int | None, deadline: Deadline) -> bytes:
        if task_id is None:
            raise BadRequest(f"{display_uri(uri)} is read through Label Studio's resolve endpoint, which needs the task id")
        base = self.label_studio_url
        if not base:
            raise ImageUnavailable(
                f"{display_uri(uri)} is read through Label Studio, but the Label Studio URL is unknown: "
                "set LABEL_STUDIO_URL (or connect the backend so /setup sends the hostname)"
            )
        fileuri = base64.urlsafe_b64encode(uri.encode("utf-8")).decode("ascii")
        return self._get(f"{base}/tasks/{int(task_id)}/resolve/?fileuri={quote(fileuri)}", display_uri(uri), deadline)

    def _attempts(self) -> int:
        """How many times a transient failure is tried: 1 + IMAGE_FETCH_RETRIES."""
        return 1 + max(int(self.settings.image_fetch_retries), 0)

    def _retrying(self, attempt: Callable[[], bytes], name: str, attempts: int, deadline: Deadline) -> bytes:
        """`attempt()` until it returns, at most `attempts` times; only `_Retryable` failures are
        tried again (after backoff_s, doubled each time, while the deadline leaves time for it), and
        the last one raises its error."""
        failures = 0
        while True:
            try:
                return attempt()
            except _Retryable as exc:
                failures += 1
                delay = self.backoff_s * 2 ** (failures - 1)
                if failures >= attempts or deadline.remaining() <= delay:
                    raise exc.error from None
                log.info("fetching %s failed (%s); retry %d of %d in %.2f s", name, exc, failures, attempts - 1, delay)
                time.sleep(delay)

    def _target(self, url: str) -> FetchTarget:
        """`url` parsed once for fetching (only the Label Studio URL's own user:password allowed)."""
        return parse_fetch_url(url, allowed_userinfo=userinfo_of(self.label_studio_url))

    def _is_label_studio(self, target: FetchTarget) -> bool:
        label_studio = self._label_studio_target()
        return label_studio is not None and target.origin == label_studio.origin

    def _get(self, url: str, name: str, deadline: Deadline) -> bytes:
        """GET with bounded retries (connection errors, timeouts, 429, 5xx) and one re-authorisation
        after a 401/403 from Label Studio for personal access tokens, all within `deadline`."""
        target = self._target(url)
        fail_fast = self._label_studio_down and self._is_label_studio(target)
        attempts = 1 if fail_fast else self._attempts()
        reauthorised = False
        while True:
            try:
                return self._retrying(lambda: self._get_once(target, name, deadline, fail_fast), name, attempts, deadline)
            except _Unauthorized as exc:
                local_file = exc.status == 403 and exc.path.startswith(_LOCAL_FILES_PATH)
                auth = self.auth()
                if auth is not None and auth.is_pat and not reauthorised and not local_file:
                    auth.on_unauthorized()
                    reauthorised = True
                    continue
                origin = display_origin(self.label_studio_url)
                if local_file:
                    raise ImageUnavailable(
                        f"Label Studio at {origin} refused to serve the local file {name} (HTTP 403): local file "
                        "serving must be on (LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true in Label Studio's "
                        "environment), the file must lie under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT inside a "
                        "Local Files storage of the project, and be readable by Label Studio"
                    ) from None
                raise ImageUnavailable(
                    f"Label Studio at {origin} refused access to {name} (HTTP {exc.status}): "
                    + ("the API token is wrong or lacks access: check LABEL_STUDIO_API_KEY" if auth
                       else "no API token is configured: set LABEL_STUDIO_API_KEY")
                ) from None

    def _out_of_time(self, name: str, target: FetchTarget, deadline: Deadline) -> BackendError:
        message = (f"fetching {name} from {target.label} took longer than the {deadline.seconds:g} s allowed "
                   "(IMAGE_FETCH_DEADLINE): the host is too slow")
        return LabelStudioUnavailable(message) if self._is_label_studio(target) else ImageUnavailable(message)

    def _get_once(self, target: FetchTarget, name: str, deadline: Deadline, fail_fast: bool = False) -> bytes:
        timeout = self.settings.image_fetch_timeout_s
        if fail_fast:
            timeout = min(timeout, DEGRADED_TIMEOUT_S)
        from_label_studio = False
        for _ in range(MAX_REDIRECTS + 1):
            check_source(target, self._label_studio_target(), self._allowed, redirected_by_label_studio=from_label_studio)
            is_ls = self._is_label_studio(target)
            headers = {"Accept-Encoding": "identity"}  # sizes are checked on the wire: no gzip bombs
            headers.update(self._auth_headers_for(target))
            if deadline.remaining() <= 0:
                raise self._out_of_time(name, target, deadline)
            with self._slots.slot(target.origin, target.label, wait_s=deadline.remaining()):
                response = self._send(target, headers, timeout, name, is_ls, deadline)
                with response:
                    status = response.status_code
                    if status in _REDIRECT_STATUSES and response.headers.get("Location"):
                        following = self._target(urljoin(target.url, response.headers["Location"]))
                        if is_ls and following.path.startswith("/user/login"):
                            # Django sends unauthenticated users to the login page
                            raise _Unauthorized(status, urlsplit(target.url).path)
                        from_label_studio = is_ls
                        target = following
                        continue
                    if 200 <= status < 300:
                        return self._read_body(response, name, target, deadline)
                    self._refuse_status(status, name, target, is_ls)
        raise ImageUnavailable(f"too many redirects (more than {MAX_REDIRECTS}) fetching {name}")

    def _send(self, target: FetchTarget, headers: dict, timeout: float, name: str, is_ls: bool,
              deadline: Deadline) -> requests.Response:
        """One GET of exactly `target.url`, socket timeouts capped by what is left of the deadline."""
        timeout = max(min(timeout, deadline.remaining()), 0.01)
        try:
            return self._session().get(
                target.url, headers=headers, stream=True, allow_redirects=False, timeout=(timeout, timeout)
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            if deadline.expired:
                raise self._out_of_time(name, target, deadline) from None
            kind = "timed out" if isinstance(exc, requests.Timeout) else "could not be reached"
            if is_ls:
                raise _Retryable(LabelStudioUnavailable(
                    f"Label Studio at {target.label} {kind} while fetching {name}"
                )) from None
            raise _Retryable(ImageUnavailable(f"image host {target.label} {kind} while fetching {name}")) from None
        except requests.RequestException as exc:
            raise ImageUnavailable(f"cannot fetch {name} from {target.label}: {type(exc).__name__}") from None

    @staticmethod
    def _refuse_status(status: int, name: str, target: FetchTarget, is_ls: bool) -> None:
        """Raise the error a non-2xx, non-redirect answer means."""
        host = target.label
        if status in (401, 403) and is_ls:
            raise _Unauthorized(status, urlsplit(target.url).path)
        if status == 429 or status >= 500:
            raise _Retryable(ImageUnavailable(f"{host} answered HTTP {status} for {name}"))
        if status == 404:
            hint = ""
            if is_ls and urlsplit(target.url).path.startswith(_LOCAL_FILES_PATH):
                hint = ("; Label Studio serves a local file only from inside a Local Files storage of the project "
                        "under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
            raise ImageUnavailable(f"image {name} was not found (HTTP 404 from {host}){hint}")
        if status in (401, 403):
            raise ImageUnavailable(f"{host} refused access to {name} (HTTP {status}; an expired signed URL?)")
        raise ImageUnavailable(f"{host} answered HTTP {status} for {name}")

    def _read_body(self, response: requests.Response, name: str, target: FetchTarget, deadline: Deadline) -> bytes:
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
                if deadline.expired or deadline.remaining() <= 0:
                    raise self._out_of_time(name, target, deadline)
                chunks.append(chunk)
        except (requests.RequestException, OSError) as exc:
            if deadline.expired:
                raise self._out_of_time(name, target, deadline) from None
            raise _Retryable(ImageUnavailable(
                f"the connection to {target.label} broke while reading {name}: {type(exc).__name__}"
            )) from None
        if deadline.expired:  # the watchdog's shutdown can look like a normal end of a body without a length
            raise self._out_of_time(name, target, deadline)
        return b"".join(chunks)

    # ----------------------------------------------------------------- HTTP plumbing
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxies or .netrc credentials from the environment
            adapter = GuardedAdapter()  # sockets obey the fetch's deadline (fetch_guard.py)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

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
        return self._retrying(lambda: self._read_gcs_once(client, bucket, key, name), name, self._attempts(), deadline)

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
