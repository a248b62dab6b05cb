"""Authorization headers for Label Studio's API and file endpoints.

Label Studio 1.23 accepts two kinds of API key:
- a legacy token (40 hex characters), sent as ``Authorization: Token <token>``;
- a personal access token (PAT): a JWT *refresh* token. It is never sent as such: it is exchanged at
  ``POST {url}/api/token/refresh/ {"refresh": PAT}`` for a short-lived access token (~5 min), sent as
  ``Authorization: Bearer <access>``. The access token is refreshed shortly before its ``exp`` and once
  more when Label Studio answers 401 (clock skew, server restart, revoked session).

The refresh request goes to exactly the Label Studio URL's origin: the endpoint is parsed like every
fetched URL (`image_sources.parse_fetch_url`: no backslash or other parser tricks) and redirects
are not followed (a 307 would re-post the personal access token to wherever it points).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from collections.abc import Callable

import requests

from backends.errors import ForbiddenImageSource, ImageUnavailable, LabelStudioUnavailable
from backends.images.sources import display_origin, parse_fetch_url, userinfo_of

log = logging.getLogger(__name__)

# Refresh this long before the access token expires, but never more than this fraction of its
# lifetime (short-lived tokens would otherwise be refreshed on every call).
_REFRESH_MARGIN_S = 30.0
_REFRESH_MARGIN_FRACTION = 0.2


class LabelStudioAuthError(ImageUnavailable):
    """Label Studio rejected the configured API key (wrong, expired or revoked)."""


def _jwt_payload(token: str) -> dict | None:
    """The decoded payload (middle part) of a JWT, or None when `token` is not one. No signature check:
    the client only needs `exp`; Label Studio checks the signature."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        return None
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def strip_key_scheme(api_key: str) -> str:
    """Accept keys pasted with their header scheme ("Token abc", "Bearer eyJ...")."""
    key = api_key.strip()
    for prefix in ("Token ", "Bearer "):
        if key.startswith(prefix):
            return key[len(prefix) :].strip()
    return key


class LabelStudioAuth:
    """Authorization for Label Studio: legacy token ("Token <t>") or personal access token (a JWT
    refresh token: POST {url}/api/token/refresh/ {"refresh": PAT} -> {"access"}; use "Bearer <access>",
    refresh again shortly before expiry (read exp from the JWT payload) and once more on a 401).

    Thread-safe: concurrent callers share one access token and at most one refresh runs at a time.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        timeout_s: float = 10.0,
        *,
        clock: Callable[[], float] = time.time,
        session: requests.Session | None = None,
    ):
        self.url = url.rstrip("/")
        self._shown_url = display_origin(self.url)  # for messages: never the URL's user:password
        self._api_key = strip_key_scheme(api_key)
        self._timeout_s = timeout_s
        self._clock = clock
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxies or .netrc credentials from the environment
        self._session = session
        self._lock = threading.Lock()
        self._access: str | None = None
        self._refresh_at = 0.0
        self.refresh_count = 0  # how many times an access token was fetched (for tests and metrics)
        self.is_pat = self.is_personal_access_token(self._api_key)

    @staticmethod
    def is_personal_access_token(api_key: str) -> bool:
        """True when `api_key` is a JWT (a PAT), False for a legacy token."""
        payload = _jwt_payload(strip_key_scheme(api_key))
        return payload is not None

    def headers(self) -> dict[str, str]:
        """The Authorization header to send to Label Studio (refreshing a PAT's access token when due)."""
        if not self.is_pat:
            return {"Authorization": f"Token {self._api_key}"}
        with self._lock:
            if self._access is None or self._clock() >= self._refresh_at:
                self._refresh_locked()
            return {"Authorization": f"Bearer {self._access}"}

    def on_unauthorized(self) -> None:
        """Label Studio answered 401: forget the access token so the next `headers()` refreshes it.
        No effect for legacy tokens (there is nothing to refresh)."""
        if self.is_pat:
            with self._lock:
                self._access = None

    def _refresh_locked(self) -> None:
        try:
            endpoint = parse_fetch_url(f"{self.url}/api/token/refresh/", allowed_userinfo=userinfo_of(self.url))
        except ForbiddenImageSource as error:
            raise LabelStudioAuthError(
                f"the Label Studio URL is not usable for the token refresh ({error.message}): check LABEL_STUDIO_URL"
            ) from None
        try:
            response = self._session.post(
                endpoint.url, json={"refresh": self._api_key}, timeout=self._timeout_s, allow_redirects=False
            )
        except requests.RequestException as exc:
            raise LabelStudioUnavailable(
                f"Label Studio at {self._shown_url} did not answer the token refresh: {type(exc).__name__}"
            ) from None
        if 300 <= response.status_code < 400:
            raise LabelStudioAuthError(
                f"Label Studio at {self._shown_url} answered the token refresh with a redirect "
                f"(HTTP {response.status_code}), which is not followed: set LABEL_STUDIO_URL to the address "
                "Label Studio answers on (http or https, host and port)"
            )
        if response.status_code in (400, 401, 403):
            raise LabelStudioAuthError(
                f"Label Studio at {self._shown_url} rejected the personal access token (HTTP {response.status_code}): "
                "it is wrong, expired or revoked; create a new one in Account & Settings and set LABEL_STUDIO_API_KEY"
            )
        if response.status_code >= 500:
            raise LabelStudioUnavailable(
                f"Label Studio at {self._shown_url} failed the token refresh (HTTP {response.status_code})"
            )
        try:
            access = response.json()["access"]
        except (ValueError, KeyError, TypeError):
            raise LabelStudioAuthError(
                f"Label Studio at {self._shown_url} answered the token refresh (HTTP {response.status_code}) "
                "without an access token: is this URL a Label Studio server?"
            ) from None
        now = self._clock()
        payload = _jwt_payload(access) or {}
        expires = payload.get("exp")
        if isinstance(expires, (int, float)):
            lifetime = max(float(expires) - now, 0.0)
            self._refresh_at = now + lifetime - min(_REFRESH_MARGIN_S, lifetime * _REFRESH_MARGIN_FRACTION)
        else:  # opaque access token: refresh well within Label Studio's default 5 minutes
            self._refresh_at = now + 240.0
        self._access = access
        self.refresh_count += 1
        log.debug("refreshed the Label Studio access token (valid for %.0f s)", self._refresh_at - now)

    def __repr__(self) -> str:
        kind = "personal access token" if self.is_pat else "legacy token"
        return f"LabelStudioAuth(url={self._shown_url!r}, kind={kind!r})"

    __str__ = __repr__
