"""The one client of Label Studio: where it is, how to authorise, and every HTTP call to it.

Used by the image fetcher (file downloads), training (`get_json`: the project and its export), the
prediction refresher (`call_api`: tasks and predictions), the server's /health probe (`health`) and
/setup (`configure`). sdk_scripts/ use label-studio-sdk.

Where Label Studio is: LABEL_STUDIO_URL, else the hostname of the first /setup (trust on first use:
a later /setup naming another origin is refused, counted and shown in /health). The API key:
LABEL_STUDIO_API_KEY, else the first /setup's access token; a legacy token or a personal access
token, refreshed by backends/label_studio/auth.py.

The token is attached in one place (`headers_for`), and only when scheme, host and port all equal
the Label Studio URL's. Every URL is parsed once (`sources.parse_fetch_url`) and the allow-list, the
metadata block, the token decision and the connection all use that parse.

`download` also serves image URLs outside Label Studio (IMAGE_ALLOWED_HOSTS, and wherever Label
Studio redirects to: presigned storage URLs), because which hop gets the token and which redirect
may go anywhere are Label Studio rules. Redirects are followed by hand (at most 5), each hop checked
again. Each download runs under the caller's total deadline (IMAGE_FETCH_DEADLINE, enforced on the
socket) and at most IMAGE_FETCH_PER_HOST downloads per host run at once (backends/images/fetch_guard.py).
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from backends.errors import (
    BackendError,
    ForbiddenImageSource,
    ImageUnavailable,
    LabelStudioUnavailable,
)
from backends.images.fetch_guard import Deadline, GuardedAdapter, HostSlots
from backends.images.retries import FIRST_BACKOFF_S, Retryable, retrying
from backends.images.sources import (
    FetchTarget,
    check_source,
    display_origin,
    parse_fetch_url,
    parse_host_entry,
    userinfo_of,
)
from backends.label_studio.auth import LabelStudioAuth
from backends.settings import Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
DEGRADED_TIMEOUT_S = 2.0  # the /health probe's timeout, and a download's while Label Studio is down
API_TIMEOUT_S = 120.0  # an export of a large project takes a while
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_LOCAL_FILES_PATH = "/data/local-files"
_UNKNOWN = (
    "cannot reach the Label Studio API: its URL or API key is unknown "
    "(set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or connect the backend in Label Studio)"
)


class _Unauthorized(Exception):
    """Label Studio answered 401/403 (or sent us to its login page) for `path`."""

    def __init__(self, status: int, path: str = ""):
        super().__init__(status)
        self.status = status
        self.path = path


class LabelStudioClient:
    """Label Studio as this process knows it. Thread-safe; one per backend process.

    `backoff_s` (first retry delay of a download, doubled each time) is an attribute so tests can
    shorten it.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.backoff_s = FIRST_BACKOFF_S
        self._lock = threading.Lock()
        self._hostname: str | None = None  # from the first /setup, when LABEL_STUDIO_URL is unset
        self._access_token: str | None = None
        self._refused_hostnames = 0
        self._refused_tokens = 0
        self._said_hostname_ignored = False
        self._auth: LabelStudioAuth | None = None
        self._auth_for: tuple[str, str] | None = None
        self._parsed: tuple[str, FetchTarget | None] = ("", None)
        self._local = threading.local()
        self._allowed = tuple(parse_host_entry(entry) for entry in settings.image_allowed_hosts)
        self._slots = HostSlots(settings.image_fetch_per_host, settings.image_fetch_queue_wait_s)
        # Set by `health` (the /health probe): while Label Studio is known to be down, downloads
        # from it make one short attempt instead of retrying for minutes.
        self._down = False

    # ----------------------------------------------------------------- where Label Studio is
    @property
    def url(self) -> str:
        """LABEL_STUDIO_URL, else the first /setup's hostname, without a trailing slash ("" when unknown)."""
        return (self.settings.label_studio_url or self._hostname or "").rstrip("/")

    def target(self) -> FetchTarget | None:
        """The Label Studio URL parsed like every fetched URL (its own user:password allowed); None
        when unknown or unusable."""
        url = self.url
        cached_for, target = self._parsed
        if url != cached_for:
            try:
                target = parse_fetch_url(url, allowed_userinfo=userinfo_of(url)) if url else None
            except ForbiddenImageSource as error:
                log.error(
                    "the Label Studio URL is not usable (%s): set LABEL_STUDIO_URL to http(s)://host:port",
                    error.message,
                )
                target = None
            self._parsed = (url, target)
        return target

    def owns(self, target: FetchTarget) -> bool:
        """Whether `target` has Label Studio's origin (scheme, host and port)."""
        label_studio = self.target()
        return label_studio is not None and target.origin == label_studio.origin

    def parse(self, url: str) -> FetchTarget:
        """`url` parsed once for fetching (only the Label Studio URL's own user:password allowed)."""
        return parse_fetch_url(url, allowed_userinfo=userinfo_of(self.url))

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

    def setup_report(self) -> dict:
        """For /health: where the Label Studio URL comes from and how many /setup values were refused."""
        source = (
            "LABEL_STUDIO_URL" if self.settings.label_studio_url else "first /setup" if self._hostname else "unknown"
        )
        return {
            "url_from": source,
            "refused_hostnames": self._refused_hostnames,
            "refused_tokens": self._refused_tokens,
        }

    def _setup_origin(self, hostname: str | None) -> FetchTarget | None:
        if not hostname or not hostname.strip():
            return None
        try:
            return parse_fetch_url(hostname.strip())
        except ForbiddenImageSource as error:
            log.warning(
                "/setup sent a Label Studio hostname that is not a plain http(s) URL (%s); ignored", error.message
            )
            with self._lock:
                self._refused_hostnames += 1
            return None

    def _accept_hostname(self, hostname: str | None, offered: FetchTarget | None) -> None:
        if offered is None or hostname is None:
            return
        shown = display_origin(hostname)
        if self.settings.label_studio_url:
            if not self._said_hostname_ignored:
                self._said_hostname_ignored = True
                log.info(
                    "/setup hostname %s is not used: LABEL_STUDIO_URL (%s) is set",
                    shown,
                    display_origin(self.settings.label_studio_url),
                )
            return
        if self._hostname is None:
            self._hostname = hostname.strip().rstrip("/")
            log.warning(
                "trusting Label Studio at %s, the hostname of the first /setup, for the life of this "
                "process; production sets LABEL_STUDIO_URL (and basic auth)",
                shown,
            )
            return
        trusted = self.target()
        if trusted is None or offered.origin != trusted.origin:
            self._refused_hostnames += 1
            log.warning(
                "/setup asked to move Label Studio from %s to %s: refused (the first /setup's hostname is "
                "kept; set LABEL_STUDIO_URL to choose)",
                display_origin(self._hostname),
                shown,
            )

    def _accept_token(self, access_token: str | None, offered: FetchTarget | None) -> None:
        token = (access_token or "").strip()
        if not token or self.settings.label_studio_api_key or token == self._access_token:
            return
        if self._access_token is None:  # trust on first use, like the hostname
            self._access_token = token
            return
        trusted = self.target()
        if offered is not None and trusted is not None and offered.origin == trusted.origin:
            self._access_token = token
            return
        self._refused_tokens += 1
        log.warning(
            "/setup sent a different access token with a hostname that is not Label Studio's: refused "
            "(the first one is kept; set LABEL_STUDIO_API_KEY to choose)"
        )

    # ----------------------------------------------------------------- authorisation
    def auth(self) -> LabelStudioAuth | None:
        """The Label Studio authorization in use, or None when the URL or the key is unknown."""
        url = self.url
        key = self.settings.label_studio_api_key or self._access_token or ""
        if not url or not key:
            return None
        with self._lock:
            if self._auth is None or self._auth_for != (url, key):
                session = requests.Session()
                session.trust_env = False
                self._auth = LabelStudioAuth(url, key, timeout_s=self.settings.image_fetch_timeout_s, session=session)
                self._auth_for = (url, key)
            return self._auth

    def headers_for(self, target: FetchTarget) -> dict[str, str]:
        """The Authorization header for `target`: only when its scheme, host and port all equal the
        Label Studio URL's. The one place a token is attached to an outgoing request."""
        if not self.owns(target):
            return {}
        auth = self.auth()
        return auth.headers() if auth is not None else {}

    # ----------------------------------------------------------------- the API
    def get_json(self, path: str, params: dict | None = None, timeout_s: float = API_TIMEOUT_S) -> Any:
        """GET a Label Studio API path (``/api/...``) and return its JSON (see `call_api`). Raises
        LabelStudioUnavailable also when Label Studio answers anything but 200."""
        status, answer = self.call_api("GET", path, params=params, timeout_s=timeout_s)
        if status != 200:
            raise LabelStudioUnavailable(f"Label Studio answered HTTP {status} to GET {path}")
        return answer

    def call_api(
        self,
        method: str,
        path: str,
        *,
        params: dict | None = None,
        body: Any = None,
        timeout_s: float = API_TIMEOUT_S,
    ) -> tuple[int, Any]:
        """Send `method` to a Label Studio API path (``/api/...``), with `body` as JSON when given:
        (HTTP status, the answer's JSON, or None when it is empty or a non-2xx answer is not JSON).
        A personal access token's access token is refreshed once after a 401; no redirect is
        followed (a token never leaves the Label Studio origin). Raises LabelStudioUnavailable when
        the URL or key is unknown, Label Studio does not answer, or a 2xx answer is not JSON."""
        auth = self.auth()
        if not self.url or auth is None:
            raise LabelStudioUnavailable(_UNKNOWN)
        target = self.parse(f"{self.url}{path}")
        response = self._send_api(method, target, path, params, body, timeout_s)
        if response.status_code == 401:  # a personal access token's access token expired: refresh once
            auth.on_unauthorized()
            response = self._send_api(method, target, path, params, body, timeout_s)
        status = response.status_code
        if not response.content:
            return status, None
        try:
            return status, response.json()
        except ValueError:
            if 200 <= status < 300:
                raise LabelStudioUnavailable(f"Label Studio answered {method} {path} with something not JSON") from None
            return status, None

    def _send_api(
        self, method: str, target: FetchTarget, path: str, params: dict | None, body: Any, timeout_s: float
    ) -> requests.Response:
        headers = self.headers_for(target)
        if not headers:
            raise ForbiddenImageSource(f"{method} {path} would leave the Label Studio origin: refused")
        try:
            return self._session().request(
                method,
                target.url,
                params=params,
                json=body,
                headers=headers,
                timeout=timeout_s,
                allow_redirects=False,
            )
        except requests.RequestException as error:
            raise LabelStudioUnavailable(
                f"Label Studio did not answer {method} {path}: {type(error).__name__}"
            ) from None

    def health(self) -> bool:
        """Whether Label Studio answers its /health within ~2 s (False also when no URL is known).
        While it does not, downloads from it fail fast (one short attempt)."""
        url = self.url
        if not url or self.target() is None:
            return False
        try:
            target = self.parse(f"{url}/health")
            response = self._session().get(target.url, timeout=DEGRADED_TIMEOUT_S, allow_redirects=False)
            response.close()
            reachable = response.status_code == 200
        except (requests.RequestException, ForbiddenImageSource):
            reachable = False
        self._down = not reachable
        return reachable

    # ----------------------------------------------------------------- file downloads
    def download(self, url: str, name: str, deadline: Deadline) -> bytes:
        """The bytes at `url` (a Label Studio URL, an IMAGE_ALLOWED_HOSTS URL, or where Label Studio
        redirects), at most IMAGE_MAX_MB, within `deadline`. Transient failures (connection errors,
        timeouts, 429, 5xx) are tried 1 + IMAGE_FETCH_RETRIES times; a 401/403 from Label Studio
        with a personal access token refreshes it once. `name` names the image in messages.

        Raises ForbiddenImageSource, ImageUnavailable, LabelStudioUnavailable, and ImageHostBusy
        (503) when the host already has IMAGE_FETCH_PER_HOST downloads in flight.
        """
        target = self.parse(url)
        fail_fast = self._down and self.owns(target)
        attempts = 1 if fail_fast else 1 + max(int(self.settings.image_fetch_retries), 0)
        reauthorised = False
        while True:
            try:
                return retrying(
                    lambda: self._download_once(target, name, deadline, fail_fast),
                    name,
                    attempts,
                    deadline,
                    self.backoff_s,
                )
            except _Unauthorized as exc:
                local_file = exc.status == 403 and exc.path.startswith(_LOCAL_FILES_PATH)
                auth = self.auth()
                if auth is not None and auth.is_pat and not reauthorised and not local_file:
                    auth.on_unauthorized()
                    reauthorised = True
                    continue
                origin = display_origin(self.url)
                if local_file:
                    raise ImageUnavailable(
                        f"Label Studio at {origin} refused to serve the local file {name} (HTTP 403): local file "
                        "serving must be on (LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true in Label Studio's "
                        "environment), the file must lie under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT inside a "
                        "Local Files storage of the project, and be readable by Label Studio"
                    ) from None
                raise ImageUnavailable(
                    f"Label Studio at {origin} refused access to {name} (HTTP {exc.status}): "
                    + (
                        "the API token is wrong or lacks access: check LABEL_STUDIO_API_KEY"
                        if auth
                        else "no API token is configured: set LABEL_STUDIO_API_KEY"
                    )
                ) from None

    def _out_of_time(self, name: str, target: FetchTarget, deadline: Deadline) -> BackendError:
        message = (
            f"fetching {name} from {target.label} took longer than the {deadline.seconds:g} s allowed "
            "(IMAGE_FETCH_DEADLINE): the host is too slow"
        )
        return LabelStudioUnavailable(message) if self.owns(target) else ImageUnavailable(message)

    def _download_once(self, target: FetchTarget, name: str, deadline: Deadline, fail_fast: bool = False) -> bytes:
        """One try: the redirect chain from `target`, each hop checked, ending in a 2xx body."""
        timeout = self.settings.image_fetch_timeout_s
        if fail_fast:
            timeout = min(timeout, DEGRADED_TIMEOUT_S)
        from_label_studio = False
        for _ in range(MAX_REDIRECTS + 1):
            check_source(target, self.target(), self._allowed, redirected_by_label_studio=from_label_studio)
            is_ls = self.owns(target)
            headers = {"Accept-Encoding": "identity"}  # sizes are checked on the wire: no gzip bombs
            headers.update(self.headers_for(target))
            if deadline.remaining() <= 0:
                raise self._out_of_time(name, target, deadline)
            with self._slots.slot(target.origin, target.label, wait_s=deadline.remaining()):
                response = self._send(target, headers, timeout, name, is_ls, deadline)
                with response:
                    status = response.status_code
                    if status in _REDIRECT_STATUSES and response.headers.get("Location"):
                        following = self.parse(urljoin(target.url, response.headers["Location"]))
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

    def _send(
        self, target: FetchTarget, headers: dict, timeout: float, name: str, is_ls: bool, deadline: Deadline
    ) -> requests.Response:
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
                raise Retryable(
                    LabelStudioUnavailable(f"Label Studio at {target.label} {kind} while fetching {name}")
                ) from None
            raise Retryable(ImageUnavailable(f"image host {target.label} {kind} while fetching {name}")) from None
        except requests.RequestException as exc:
            raise ImageUnavailable(f"cannot fetch {name} from {target.label}: {type(exc).__name__}") from None

    @staticmethod
    def _refuse_status(status: int, name: str, target: FetchTarget, is_ls: bool) -> None:
        """Raise the error a non-2xx, non-redirect answer means."""
        host = target.label
        if status in (401, 403) and is_ls:
            raise _Unauthorized(status, urlsplit(target.url).path)
        if status == 429 or status >= 500:
            raise Retryable(ImageUnavailable(f"{host} answered HTTP {status} for {name}"))
        if status == 404:
            hint = ""
            if is_ls and urlsplit(target.url).path.startswith(_LOCAL_FILES_PATH):
                hint = (
                    "; Label Studio serves a local file only from inside a Local Files storage of the project "
                    "under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
                )
            raise ImageUnavailable(f"image {name} was not found (HTTP 404 from {host}){hint}")
        if status in (401, 403):
            raise ImageUnavailable(f"{host} refused access to {name} (HTTP {status}; an expired signed URL?)")
        raise ImageUnavailable(f"{host} answered HTTP {status} for {name}")

    def _read_body(self, response: requests.Response, name: str, target: FetchTarget, deadline: Deadline) -> bytes:
        limit = self.settings.image_max_bytes
        too_large = ImageUnavailable(f"image {name} is larger than the limit of {limit / 2**20:.1f} MiB (IMAGE_MAX_MB)")
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
            raise Retryable(
                ImageUnavailable(f"the connection to {target.label} broke while reading {name}: {type(exc).__name__}")
            ) from None
        if deadline.expired:  # the watchdog's shutdown can look like a normal end of a body without a length
            raise self._out_of_time(name, target, deadline)
        return b"".join(chunks)

    def _session(self) -> requests.Session:
        """This thread's session: no proxies or .netrc from the environment, sockets under the deadline."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxies or .netrc credentials from the environment
            adapter = GuardedAdapter()  # sockets obey the fetch's deadline (fetch_guard.py)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session
