"""Where an image may be fetched from (the SSRF guard) and how an image URI is named.

Pure functions over URL strings: no requests are made here apart from the DNS lookup in
`resolves_to_metadata`.
- `parse_fetch_url`: parse an http(s) URL ONCE into a `FetchTarget` (scheme, host, port and the URL
  rebuilt from those checked parts). URLs that URL parsers read differently are refused: a
  backslash before the query, control characters or whitespace, user information (``user@``)
  other than the configured Label Studio URL's, a host that is not a plain name or IP literal, a
  non-ASCII host. urllib3 (what requests connects with) must then read the same scheme, host and
  port from the rebuilt URL, else it is refused too. Everything downstream (the allow-list, the
  metadata block, whether the token is sent, the connection) uses that one `FetchTarget`.
- `check_source` (over a `FetchTarget`): the Label Studio origin, IMAGE_ALLOWED_HOSTS entries (``host`` or
  ``host:port``), or any http(s) host when Label Studio itself issued the redirect (it hands out
  presigned storage URLs); link-local and cloud metadata addresses never, even when listed.
- `stable_uri`: the URI without signature query parameters (a re-signed URL names the same image).
- `display_uri`: the URI as shown in messages and logs (no query string, no credentials).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

import requests
from urllib3.util import parse_url

from backends.errors import ForbiddenImageSource
from backends.logs import redact

STORAGE_SCHEMES = frozenset({"gs", "gcs", "s3", "azure-blob"})
# Query parameters that sign or authorise a URL: they change on every signing, so they are no part
# of an image's identity (GCS, S3, Azure SAS, CloudFront, generic tokens).
SIGNATURE_PARAMS = frozenset(
    {
        "signature",
        "expires",
        "googleaccessid",
        "sig",
        "se",
        "sp",
        "sv",
        "st",
        "sr",
        "spr",
        "ss",
        "srt",
        "skoid",
        "sktid",
        "skt",
        "ske",
        "sks",
        "skv",
        "token",
        "access_token",
        "key-pair-id",
        "policy",
    }
)
SIGNATURE_PREFIXES = ("x-goog-", "x-amz-")
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})
METADATA_ADDRESSES = (ipaddress.ip_address("fd00:ec2::254"),)
MAX_URL_CHARS = 16_384
# userinfo@ (optional), then a plain host name / IPv4 literal or a bracketed IPv6 literal (no zone
# id), then an optional port of 1-5 digits. Anything else in an authority is refused.
_AUTHORITY = re.compile(
    r"(?:(?P<userinfo>[^@\[\]/?#\\]*)@)?(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class FetchTarget:
    """An http(s) URL parsed once and checked. `host` is lower-case (IPv6 without brackets); `port`
    is explicit or the scheme's default; `url` is rebuilt from these parts (path and query kept,
    fragment dropped), so the connection goes to exactly (scheme, host, port)."""

    scheme: str
    host: str
    port: int
    path: str
    url: str

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def label(self) -> str:
        """``host:port`` for messages."""
        return f"{self.host}:{self.port}"


def _refuse(url: str, why: str) -> ForbiddenImageSource:
    # Shown as written (not as one parser reads it), without its query, credentials redacted.
    shown = redact(_head(url))
    shown = shown if len(shown) <= 200 else shown[:197] + "..."
    return ForbiddenImageSource(f"image URL {shown!r} is refused: {why}")


def _head(url: str) -> str:
    """The part before the first ``?`` or ``#``: scheme, authority and path for every URL parser."""
    return re.split(r"[?#]", url, maxsplit=1)[0]


def parse_fetch_url(url: str, allowed_userinfo: str | None = None) -> FetchTarget:
    """Parse and check an http(s) URL once; raise ForbiddenImageSource when parsers could read it
    differently. `allowed_userinfo`: the ``user:password`` part of the configured Label Studio URL,
    the only user information accepted (task URLs never carry any)."""
    if not isinstance(url, str) or not url:
        raise ForbiddenImageSource("image URL is empty")
    if len(url) > MAX_URL_CHARS:
        raise _refuse(url, f"it is longer than {MAX_URL_CHARS} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise _refuse(url, "it contains control characters")
    head = _head(url)
    if "\\" in head:
        raise _refuse(url, "it contains a backslash before its query, which URL parsers read differently")
    if any(c.isspace() for c in head.partition("//")[2].partition("/")[0]) or url != url.strip():
        raise _refuse(url, "it contains whitespace in its host part")
    try:
        parts = urlsplit(url)
    except ValueError as error:
        raise _refuse(url, f"it is not a valid URL ({error})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ForbiddenImageSource(f"image URL scheme {scheme or '(none)'}: is not allowed (only http and https)")
    if not parts.netloc:
        raise ForbiddenImageSource("image URL has no host")
    if not parts.netloc.isascii():
        raise _refuse(url, "its host is not ASCII (write an internationalised name in its xn-- form)")
    authority = _AUTHORITY.fullmatch(parts.netloc)
    if authority is None:
        raise _refuse(url, "its host part is not a plain host name or IP address with an optional port")
    userinfo = authority["userinfo"]
    if userinfo is not None and userinfo != allowed_userinfo:
        raise _refuse(url, "it carries user information (user@host); credentials never come from an image URL")
    host = authority["host"].strip("[]").lower()
    port = int(authority["port"]) if authority["port"] else _DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise _refuse(url, f"port {port} is out of range")
    bracketed = f"[{host}]" if ":" in host else host
    netloc = (f"{userinfo}@" if userinfo is not None else "") + bracketed
    if authority["port"]:
        netloc += f":{port}"
    rebuilt = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
    target = FetchTarget(scheme, host, port, parts.path or "/", rebuilt)
    # What requests will send and urllib3 connect to must be exactly what was checked.
    try:
        prepared = requests.Request("GET", rebuilt).prepare().url
    except (requests.RequestException, ValueError) as error:
        raise _refuse(url, f"it is not a valid URL ({type(error).__name__})") from None
    for seen in (url, prepared):
        if _urllib3_origin(seen) != target.origin:
            raise _refuse(url, "URL parsers disagree on its host or port")
    return target


def _urllib3_origin(url: str | None) -> tuple[str, str, int] | None:
    if url is None:  # requests prepared no URL
        return None
    try:
        parsed = parse_url(url)
    except Exception:  # urllib3's LocationParseError and friends
        return None
    scheme = (parsed.scheme or "").lower()
    return scheme, (parsed.host or "").strip("[]").lower(), parsed.port or _DEFAULT_PORTS.get(scheme, -1)


def userinfo_of(url: str) -> str | None:
    """The ``user:password`` part of a configured URL, or None."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return None
    return netloc.rpartition("@")[0] if "@" in netloc else None


def display_origin(url: str) -> str:
    """``scheme://host:port`` of a configured URL without credentials, for messages and /health."""
    try:
        target = parse_fetch_url(url, allowed_userinfo=userinfo_of(url))
    except ForbiddenImageSource:
        return display_uri(url)
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"{target.scheme}://{host}:{target.port}"


def is_signature_param(name: str) -> bool:
    lowered = name.strip().lower()
    return lowered in SIGNATURE_PARAMS or lowered.startswith(SIGNATURE_PREFIXES)


def display_uri(uri: str) -> str:
    """A URI safe for messages and logs: no query string, no credentials, at most 200 characters.
    Never raises: it describes malformed URIs too (a port that is not a number, a broken IPv6 host)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "(an unparseable URI)"
    netloc = parts.netloc.rpartition("@")[2]  # user:password@ dropped
    shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    if parts.query and not parts.scheme:  # Label Studio local files: ?d=<path> is the image's name
        shown += "?" + "&".join(p for p in parts.query.split("&") if not is_signature_param(p.split("=", 1)[0]))
    return shown if len(shown) <= 200 else shown[:197] + "..."


def parse_host_entry(entry: str) -> tuple[str, int | None]:
    """IMAGE_ALLOWED_HOSTS entry -> (host, port or None): "cdn.example.com", "10.0.0.5:9000",
    "[::1]:8080" or a full URL "https://cdn.example.com"."""
    entry = entry.strip()
    parts = urlsplit(entry if "://" in entry else "//" + entry)
    try:
        port = parts.port
    except ValueError:
        port = None
    return (parts.hostname or entry).lower(), port


def _parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:  # legacy IPv4 spellings the resolver accepts: 2852039166, 0xA9FEA9FE, 169.254.43518
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def _is_metadata_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_link_local or address in METADATA_ADDRESSES


def is_metadata_host(host: str) -> bool:
    host = host.strip("[]").rstrip(".").lower()
    if host in METADATA_HOSTS:
        return True
    address = _parse_ip(host)
    return address is not None and _is_metadata_address(address)


def resolves_to_metadata(host: str, port: int) -> bool:
    """Whether a (non-literal) allow-listed host name resolves to a link-local address."""
    if _parse_ip(host) is not None:
        return False
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False  # unresolvable: the request itself will fail with a clear message
    for info in infos:
        address = _parse_ip(str(info[4][0]).split("%", 1)[0])
        if address is not None and _is_metadata_address(address):
            return True
    return False


def stable_uri(uri: str) -> str:
    """`uri` without signature query parameters (X-Goog-*, X-Amz-*, Signature, Expires, sig, se, sp,
    sv, token, ...); other parameters keep their order."""
    uri = uri.strip()
    try:
        parts = urlsplit(uri)
    except ValueError:  # malformed: the fetch refuses it; as a key it is just a string
        return uri
    if not parts.query:
        return uri
    kept = [
        piece for piece in parts.query.split("&") if piece and not is_signature_param(unquote(piece.split("=", 1)[0]))
    ]
    return urlunsplit(parts._replace(query="&".join(kept)))


def check_source(
    target: FetchTarget,
    label_studio: FetchTarget | None,
    allowed_hosts: tuple[tuple[str, int | None], ...],
    redirected_by_label_studio: bool = False,
) -> None:
    """Raise ForbiddenImageSource unless `target` may be fetched. `label_studio`: the configured Label
    Studio URL parsed the same way (None when unknown); `allowed_hosts` from `parse_host_entry`."""
    host, port = target.host, target.port
    if is_metadata_host(host):
        raise ForbiddenImageSource(
            f"image host {host} is a link-local or cloud metadata address: never fetched, even when allow-listed"
        )
    if (label_studio is not None and target.origin == label_studio.origin) or redirected_by_label_studio:
        return
    if not any(host == allowed_host and allowed_port in (None, port) for allowed_host, allowed_port in allowed_hosts):
        ls = label_studio.label if label_studio is not None else "not configured"
        raise ForbiddenImageSource(
            f"image host {host}:{port} is neither Label Studio ({ls}) nor in IMAGE_ALLOWED_HOSTS"
        )
    if resolves_to_metadata(host, port):
        raise ForbiddenImageSource(f"image host {host} resolves to a link-local or cloud metadata address")
