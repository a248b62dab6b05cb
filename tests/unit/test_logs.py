"""Log redaction: each secret pattern, what must survive, and the filter on real handlers."""

from __future__ import annotations

import io
import json
import logging

import pytest

from backends.logs import MAX_MESSAGE_CHARS, RedactingFilter, configure_logging, redact
from tests.support.label_studio import make_jwt

LEGACY = "0123456789abcdef0123456789abcdef01234567"
JWT = make_jwt({"token_type": "refresh", "exp": 1893456000, "user_id": 1})


@pytest.mark.parametrize(
    "text, secret",
    [
        (f"Authorization: Token {LEGACY}", LEGACY),
        (f"headers={{'Authorization': 'Bearer {JWT}'}}", JWT),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        (f"sent Token {LEGACY} to LS", LEGACY),
        (f"refresh with {JWT}", JWT),
        (json.dumps({"access_token": "tok-123-secret", "hostname": "http://ls:8080"}), "tok-123-secret"),
        (json.dumps({"refresh": "r3fr3sh-value"}), "r3fr3sh-value"),
        (json.dumps({"access": "acc3ss-value"}), "acc3ss-value"),
        ("{'api_key': 'k3y-value', 'x': 1}", "k3y-value"),
        ("LABEL_STUDIO_API_KEY=abc123def", "abc123def"),
        ("BASIC_AUTH_PASS=hunter2", "hunter2"),
        ('{"password": "hunter2"}', "hunter2"),
        ("GET /data?access_token=q1w2e3&page=2", "q1w2e3"),
        ("https://h/a.png?X-Goog-Signature=deadbeef99&X-Goog-Credential=sa%40p", "deadbeef99"),
        ("https://h/a.png?sv=2022&sig=AbC%2Fdef&se=2030", "AbC%2Fdef"),
        ("connecting to https://admin:s3cr3tpw@ls.example.com:8080/api", "s3cr3tpw"),
        (
            "opaque value Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1u here",
            "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1u",
        ),
        (f"key {LEGACY} leaked", LEGACY),
    ],
)
def test_secrets_are_redacted(text, secret):
    cleaned = redact(text)
    assert secret not in cleaned
    assert "[REDACTED]" in cleaned


@pytest.mark.parametrize(
    "text",
    [
        "fetched /data/upload/12/8f3c2a1b-nuclei_image_0001.png for task 42 in 31.5 ms",
        "task 550e8400-e29b-41d4-a716-446655440000 done",
        "model_version sam-vit_b-classic-2024-11-25 ready",
        "checkpoint sha256 ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912 verified",
        "Label Studio refused access to /data/upload/1/a.png (HTTP 401): the API token is wrong",
        'payload {"tasks": [{"id": 1}], "token_count": 3}',
        "",
    ],
)
def test_ordinary_text_survives(text):
    assert redact(text) == text


def test_redaction_is_idempotent():
    once = redact(f"Authorization: Token {LEGACY} and {JWT}")
    assert redact(once) == once


@pytest.fixture
def captured():
    """A handler on the root logger, with the root's level and handlers restored afterwards."""
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.addHandler(handler)
    yield stream, handler
    root.removeHandler(handler)
    for other in root.handlers:
        for installed in [f for f in other.filters if isinstance(f, RedactingFilter)]:
            other.removeFilter(installed)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def test_configured_logging_redacts_messages_args_and_exceptions(captured):
    stream, handler = captured
    configure_logging("info")
    configure_logging("INFO")  # idempotent: one filter per handler
    assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    log = logging.getLogger("backends.some_module")
    log.info("setup body %s", {"access_token": LEGACY, "hostname": "http://ls"})
    log.warning("header Authorization: Bearer %s", JWT)
    try:
        raise RuntimeError(f"request failed with Token {LEGACY}")
    except RuntimeError:
        log.exception("while fetching")
    log.debug("debug with %s", LEGACY)  # below the level: not written at all
    output = stream.getvalue()
    assert LEGACY not in output and JWT not in output
    assert "http://ls" in output and "while fetching" in output and "RuntimeError" in output
    assert output.count("[REDACTED]") >= 3


def test_long_messages_are_truncated(captured):
    stream, _ = captured
    configure_logging("INFO")
    rle = ",".join(str(i % 250) for i in range(20000))
    logging.getLogger("backends.masks.rle").info("result %s", rle)
    line = stream.getvalue().strip()
    assert len(line) < MAX_MESSAGE_CHARS + 100
    assert "truncated" in line


def test_unknown_level_falls_back_to_info(captured):
    configure_logging("chatty")
    assert logging.getLogger().level == logging.INFO
