"""Where an image may be fetched from (the SSRF guard) and how an image URI is named.

Pure functions over URL strings: no requests are made here apart from the DNS lookup in
`resolves_to_metadata`.
- `check_source`: http(s) only; the Label Studio origin, IMAGE_ALLOWED_HOSTS entries (``host`` or
  ``host:port``), or any http(s) host when Label Studio itself issued the redirect (it hands out
  presigned storage URLs); link-local and cloud metadata addresses never, even when listed.
- `stable_uri`: the URI without signature query parameters (a re-signed URL names the same image).
- `display_uri`: the URI as shown in messages and logs (no query string, no credentials).
"""
from __future__ import annotations

import ipaddress
import socket
from urllib.parse import unquote, urlsplit, urlunsplit

from backends.errors import ForbiddenImageSource

STORAGE_SCHEMES = frozenset({"gs", "gcs", "s3", "azure-blob"})
# Query parameters that sign or authorise a URL: they change on every signing, so they are no part
# of an image's identity (GCS, S3, Azure SAS, CloudFront, generic tokens).
SIGNATURE_PARAMS = frozenset({
    "signature", "expires", "googleaccessid", "sig", "se", "sp", "sv", "st", "sr", "spr", "ss", "srt",
    "skoid", "sktid", "skt", "ske", "sks", "skv", "token", "access_token", "key-pair-id", "policy",
})
SIGNATURE_PREFIXES = ("x-goog-", "x-amz-")
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})
METADATA_ADDRESSES = (ipaddress.ip_address("fd00:ec2::254"),)


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


def origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


def host_label(url: str) -> str:
    scheme, host, port = origin(url)
    return f"{host}:{port}"


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
        piece for piece in parts.query.split("&")
        if piece and not is_signature_param(unquote(piece.split("=", 1)[0]))
    ]
    return urlunsplit(parts._replace(query="&".join(kept)))


def same_origin(url: str, other: str) -> bool:
    """Same scheme, host and port (default ports filled in)."""
    return bool(url) and bool(other) and origin(url) == origin(other)


def check_source(
    url: str,
    label_studio_url: str,
    allowed_hosts: tuple[tuple[str, int | None], ...],
    redirected_by_label_studio: bool = False,
) -> None:
    """Raise ForbiddenImageSource unless `url` may be fetched. `allowed_hosts` from `parse_host_entry`."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ForbiddenImageSource(f"image URL scheme {scheme or '(none)'}: is not allowed (only http and https)")
    host = (parts.hostname or "").lower()
    if not host:
        raise ForbiddenImageSource("image URL has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise ForbiddenImageSource(f"image URL for host {host} has an invalid port") from None
    if is_metadata_host(host):
        raise ForbiddenImageSource(
            f"image host {host} is a link-local or cloud metadata address: never fetched, even when allow-listed"
        )
    if same_origin(url, label_studio_url) or redirected_by_label_studio:
        return
    if not any(host == allowed_host and allowed_port in (None, port) for allowed_host, allowed_port in allowed_hosts):
        ls = host_label(label_studio_url) if label_studio_url else "not configured"
        raise ForbiddenImageSource(f"image host {host}:{port} is neither Label Studio ({ls}) nor in IMAGE_ALLOWED_HOSTS")
    if resolves_to_metadata(host, port):
        raise ForbiddenImageSource(f"image host {host} resolves to a link-local or cloud metadata address")
