"""Assertions every reliability test makes about an answer, whichever client produced it
(starlette's TestClient or requests against a real process)."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, settings

# Hypothesis settings for the fuzzers: reproducible in CI (derandomize), no example database in
# the checkout, no deadline (a shared 2-core machine), generation-sized health checks off.
FUZZ_SETTINGS = dict(
    database=None,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


def fuzz_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, **FUZZ_SETTINGS)


def describe(response) -> str:
    request = response.request
    return f"{request.method} {request.url} -> {response.status_code}: {response.text[:800]}"


def check_answer(response) -> None:
    """No 5xx; every 4xx is JSON `{"error": "<human-readable message>"}` (HEAD answers have no body)."""
    status = response.status_code
    assert status < 500, describe(response)
    if 400 <= status < 500 and response.request.method != "HEAD":
        assert response.headers.get("content-type", "").startswith("application/json"), describe(response)
        body = response.json()
        assert isinstance(body, dict), describe(response)
        error = body.get("error")
        assert isinstance(error, str) and error.strip(), describe(response)
        # Human-readable: a sentence with words in it, not a code or a bare exception name.
        assert len(error) >= 12 and len(re.findall(r"[A-Za-z]{2,}", error)) >= 3, describe(response)


def check_healthy(get) -> dict:
    """GET /health answers 200 with status UP (Label Studio reachable, model fine); returns the report."""
    response = get("/health")
    assert response.status_code == 200, describe(response)
    report = response.json()
    assert report["status"] == "UP", report
    return report
