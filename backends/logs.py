"""Logging set-up with secrets redacted and oversized messages truncated.

`configure_logging(level)` installs `RedactingFilter` on the handlers of the root logger (and of any
logger that already has its own handlers, such as uvicorn's), so every record that reaches a handler
is scrubbed, whichever module logged it: Authorization headers, JWTs, token/key/password values in
JSON, Python reprs and query strings, credentials in URLs and long base64-like runs. Messages over
`MAX_MESSAGE_CHARS` are cut (no RLE or mask dumps in logs).
"""

from __future__ import annotations

import logging
import re
import sys

MAX_MESSAGE_CHARS = 2000
REDACTED = "[REDACTED]"

# Names whose values are secrets, in JSON ("name": "v"), reprs ('name': 'v'), env (NAME=v) and queries.
_SECRET_NAMES = (
    r"[\w-]*(?:access_token|refresh_token|api_key|apikey|api-key|password|passwd|secret|private_key"
    r"|credentials?|signature|sessionid|csrftoken|auth_pass)"
    r"|refresh|access|token|sig|x-amz-security-token|x-goog-credential"
)
_KEY_VALUE = re.compile(
    rf"""(?P<key>["']?\b(?:{_SECRET_NAMES})\b["']?\s*[:=]\s*)(?P<quote>["']?)(?P<value>[^"'&\s,;}}\]]+)""",
    re.IGNORECASE,
)
_AUTH_HEADER = re.compile(
    r"""(?P<head>\b(?:Authorization|Proxy-Authorization)["']?\s*[:=]\s*["']?(?:Token|Bearer|Basic|JWT)?\s*)"""
    r"""[^\s"',}]+""",
    re.IGNORECASE,
)
_SCHEME_TOKEN = re.compile(r"\b(?P<scheme>Token|Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]+:[^/\s@]*@")
_LONG_RUN = re.compile(r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_-]{32,}={0,2}")
_CHECKSUM_CONTEXT = re.compile(r"(?:sha\d*|md5|checksum|digest)[\s:=\"']*$", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with secrets replaced by "[REDACTED]". Pure function."""
    if not text:
        return text
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m['head']}{REDACTED}", text)
    text = _SCHEME_TOKEN.sub(lambda m: f"{m['scheme']} {REDACTED}", text)
    text = _JWT.sub(REDACTED, text)
    text = _KEY_VALUE.sub(_replace_value, text)
    return _LONG_RUN.sub(_replace_long_run, text)


def truncate(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """At most `limit` characters (plus a note of how many were cut)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [truncated {len(text) - limit} characters]"


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (arguments merged in), exception and stack text, redacted and truncated."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what can be shown
            message = f"{record.msg!r} {record.args!r}"
        # Redact only what can be shown (huge payloads cost nothing), then cut to the limit.
        shown = truncate(redact(message[: 2 * MAX_MESSAGE_CHARS]))
        if len(message) > 2 * MAX_MESSAGE_CHARS:
            shown = f"{shown[:MAX_MESSAGE_CHARS]}... [truncated {len(message) - MAX_MESSAGE_CHARS} characters]"
        record.msg = shown
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER = RedactingFilter()
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Set the root level (DEBUG, INFO, WARNING, ERROR; unknown names mean INFO), add a stderr
    handler when the root has none, and install the redacting filter on every existing handler.
    Idempotent. Call it again after a library installs its own handlers (uvicorn does at start-up,
    unless run with ``log_config=None``, in which case its records reach the root handlers)."""
    name = (level or "INFO").strip().upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    root = logging.getLogger()
    root.setLevel(numeric)
    if not root.handlers:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(stream)
    loggers = [root] + [
        logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
    if numeric > logging.DEBUG:  # urllib3 logs full URLs (signed query strings) at DEBUG
        logging.getLogger("urllib3").setLevel(max(numeric, logging.INFO))
    if name != logging.getLevelName(numeric):
        logging.getLogger(__name__).warning("unknown LOG_LEVEL %r, using INFO", level)


def _replace_value(match: re.Match) -> str:
    value = match["value"]
    if value.startswith(REDACTED[:-1]) or value.lower() in {"null", "none", "true", "false", '""', "''"}:
        return match[0]
    return f"{match['key']}{match['quote']}{REDACTED}"


def _replace_long_run(match: re.Match) -> str:
    run = match[0]
    pieces = re.split(r"[-_/]", run)
    has_digit = any(c.isdigit() for c in run)
    has_letter = any(c.isalpha() for c in run)
    # Paths, UUIDs and dashed names break into short pieces; secrets are long unbroken runs.
    if not (has_digit and has_letter) or max(len(piece) for piece in pieces) < 16:
        return run
    if _CHECKSUM_CONTEXT.search(match.string[max(0, match.start() - 12) : match.start()]):
        return run  # a published checksum is not a secret and is useful in logs
    return REDACTED
