"""Attacks on the image fetch path (issue 8: items 1, 2, 4, 8 and 11b), each against real loopback servers.

- Parser disagreement: `http://127.0.0.1:<other>\\@<label-studio>/x.png` is read as Label Studio by
  urllib's urlsplit but connected to <other> by urllib3. A second loopback server records every
  request that reaches it: none may (and none may carry a token), through the fetcher, a redirect
  from Label Studio, the personal-access-token refresh, the segmentation export loop and
  export_masks; the same shape must not get past the link-local/metadata block.
- /setup hijack: a later /setup naming another host neither moves Label Studio nor swaps its token;
  the disk image cache never serves one origin's bytes for another, after a restart either.
- Slow hosts: a host dripping one byte per second (in its headers or its body) is cut at the fetch's
  total deadline; slow fetches cannot fill the worker pool (per-host cap), so a request for another
  host is answered at once.
- Answers: a password in LABEL_STUDIO_URL never appears in an error answer or /health.
- A 403 from Label Studio's local-files endpoint names local file serving, not the token.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from backends.errors import ForbiddenImageSource, ImageUnavailable
from backends.images import sources as image_sources
from backends.images.fetcher import ImageFetcher
from backends.label_studio.auth import LabelStudioAuth
from backends.server.app import create_app
from backends.server.model_base import LabelStudioMLBase, ModelResponse
from backends.settings import Settings
from tests.reliability.checks import check_answer, describe
from tests.reliability.conftest import base_settings, segmentation_client
from tests.support import payloads
from tests.support.http_host import PNG, HttpHost, RecordedRequest, Reply
from tests.support.images import png, quadrant_rgb
from tests.support.label_studio import FakeLabelStudio

LS_PNG = png(quadrant_rgb(24, 32))
ATTACKER_PNG = png(quadrant_rgb(8, 8))


# ================================================================================== servers


class Attacker(HttpHost):
    """A loopback host that answers every request with an image and records what arrived."""

    def __init__(self):
        super().__init__(app=lambda request: Reply(200, ATTACKER_PNG, PNG))

    def tokens_seen(self) -> list[str]:
        return [r.headers["Authorization"] for r in self.requests if "Authorization" in r.headers] + [
            r.body.decode(errors="replace") for r in self.requests if b"refresh" in r.body
        ]


def drip_host(part: str) -> HttpHost:
    """A loopback host answering every request with one byte a second: `part="headers"`, the status
    line and then header bytes that never end; `part="body"`, complete headers (Content-Length
    10000) and then the body byte by byte. Its `requests` are the fetches that reached it."""
    return HttpHost(app=lambda request: Reply(200, LS_PNG.ljust(10_000, b"\0"), PNG, drip=part))


class FetchOnly(LabelStudioMLBase):
    """A model that only fetches each task's image bytes (so these tests see the fetch path alone)."""

    MODEL_VERSION = "fetch-only"

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> ModelResponse:
        for task in tasks:
            self.runtime.images.fetch_bytes(task["data"]["image"], task["id"])
        return ModelResponse(predictions=[{"result": [], "score": 0.0} for _ in tasks])


def fetch_only_client(settings: Settings) -> TestClient:
    return TestClient(create_app(FetchOnly, settings), raise_server_exceptions=False)


def predict(client: TestClient, uri: str, task_id: int = 1):
    return client.post("/predict", json=payloads.predict_body([payloads.task(task_id, uri)]))


@pytest.fixture
def ls():
    fake = FakeLabelStudio()
    fake.files["/data/upload/1/a.png"] = Reply(200, LS_PNG, PNG)
    with fake:
        yield fake


@pytest.fixture
def attacker():
    with Attacker() as server:
        yield server


def make_fetcher(tmp_path: Path, **fields) -> ImageFetcher:
    fetcher = ImageFetcher(base_settings(tmp_path, image_cache_mb=0, **fields))
    fetcher.label_studio.backoff_s = 0.01  # downloads
    fetcher.backoff_s = 0.01  # direct GCS reads
    return fetcher


def host_of(url: str) -> str:
    return url.split("//", 1)[1]


# ============================================================ 1. parser disagreement, token leaks


def disagreeing_urls(other_port: int, ls_netloc: str) -> dict[str, str]:
    """URLs that urlsplit reads as Label Studio but that could be connected elsewhere."""
    path = "/data/upload/1/a.png"
    return {
        "backslash before @": f"http://127.0.0.1:{other_port}\\@{ls_netloc}{path}",
        "backslash in the port": f"http://127.0.0.1:{other_port}\\x@{ls_netloc}{path}",
        "tab before @": f"http://127.0.0.1:{other_port}\t@{ls_netloc}{path}",
        "newline before @": f"http://127.0.0.1:{other_port}\n@{ls_netloc}{path}",
    }


@pytest.mark.parametrize("shape", list(disagreeing_urls(1, "h:2")))
def test_a_url_that_parsers_read_differently_never_reaches_another_port(ls, attacker, tmp_path, shape):
    uri = disagreeing_urls(attacker.port, host_of(ls.url))[shape]
    fetcher = make_fetcher(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.legacy_token)
    with pytest.raises(ForbiddenImageSource):
        fetcher.fetch_bytes(uri, 1)
    assert attacker.requests == [], f"{len(attacker.requests)} request(s) reached the other port"
    assert attacker.tokens_seen() == []


def test_a_backslash_url_through_predict_is_a_403_and_sends_nothing(ls, attacker, tmp_path):
    settings = base_settings(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.legacy_token)
    with fetch_only_client(settings) as client:
        response = predict(client, disagreeing_urls(attacker.port, host_of(ls.url))["backslash before @"])
    check_answer(response)
    assert response.status_code == 403 and "backslash" in response.json()["error"], describe(response)
    assert attacker.requests == []


def test_the_metadata_block_cannot_be_bypassed_with_a_backslash(attacker, tmp_path, monkeypatch):
    import urllib3.util.connection

    connects: list[tuple[str, int]] = []
    real_connect = urllib3.util.connection.create_connection

    def recording_connect(address, *args, **kwargs):
        connects.append(address)
        if address[0].startswith("169.254."):
            raise OSError("the test never lets a metadata address be contacted")
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", recording_connect)
    with HttpHost({"/good.png": LS_PNG}) as images:
        fetcher = make_fetcher(tmp_path, image_allowed_hosts=(images.netloc,))
        for uri in (
            f"http://169.254.169.254\\@{images.netloc}/latest/meta-data/",
            f"http://127.0.0.1:{attacker.port}\\@{images.netloc}/good.png",
        ):
            with pytest.raises(ForbiddenImageSource):
                fetcher.fetch_bytes(uri, 1)
        assert fetcher.fetch_bytes(f"{images.url}/good.png", 1) == LS_PNG  # the allowed host still works
    assert not [address for address in connects if address[0].startswith("169.254.")], connects
    assert attacker.requests == []


def test_a_redirect_from_label_studio_never_carries_the_token_elsewhere(ls, attacker, tmp_path):
    sneaky = disagreeing_urls(attacker.port, host_of(ls.url))["backslash before @"]
    ls.files["/data/upload/1/sneaky.png"] = Reply(302, b"", {"Location": sneaky})
    ls.files["/data/upload/1/presigned.png"] = Reply(302, b"", {"Location": f"{attacker.url}/bucket/a.png"})
    fetcher = make_fetcher(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.legacy_token)
    with pytest.raises(ForbiddenImageSource):
        fetcher.fetch_bytes("/data/upload/1/sneaky.png", 1)
    assert attacker.requests == []
    # A plain redirect issued by Label Studio (a presigned URL) is followed, without the token.
    assert fetcher.fetch_bytes("/data/upload/1/presigned.png", 2) == ATTACKER_PNG
    assert len(attacker.requests) == 1 and attacker.tokens_seen() == []


def test_the_token_refresh_goes_to_label_studio_only(ls, attacker):
    sneaky_url = f"http://127.0.0.1:{attacker.port}\\@{host_of(ls.url)}"
    with pytest.raises(ImageUnavailable):
        LabelStudioAuth(sneaky_url, ls.pat, timeout_s=2).headers()
    assert attacker.requests == []

    def redirecting(request: RecordedRequest) -> Reply:  # a 307 would re-post the PAT to Location
        if request.path == "/api/token/refresh/":
            return Reply(307, b"", {"Location": f"{attacker.url}/api/token/refresh/"})
        return ls.handle(request)

    ls.server.app = redirecting
    with pytest.raises(ImageUnavailable, match="redirect"):
        LabelStudioAuth(ls.url, ls.pat, timeout_s=2).headers()
    assert attacker.requests == [] and attacker.tokens_seen() == []


def test_a_setup_hostname_with_a_backslash_never_reaches_the_training_export(ls, attacker, tmp_path, constant_model):
    settings = base_settings(tmp_path, label_studio_api_key=ls.legacy_token, seg_checkpoint=str(constant_model))
    sneaky = f"http://127.0.0.1:{attacker.port}\\@{host_of(ls.url)}"
    with segmentation_client(settings) as client:
        assert client.post("/setup", json=payloads.setup_body(hostname=sneaky)).status_code == 200
        client.post(
            "/webhook", json={"action": "START_TRAINING", "project": {"id": 1, "label_config": payloads.LABEL_CONFIG}}
        )
        give_up = time.monotonic() + 8
        while time.monotonic() < give_up and not attacker.requests:
            training = client.get("/health").json().get("projects", {}).get("1", {})
            if training.get("state") == "failed":
                break
            time.sleep(0.1)
    assert attacker.requests == [], [f"{r.method} {r.path}" for r in attacker.requests]


def test_export_masks_fetches_images_through_the_same_guard(ls, attacker):
    from sdk_scripts.common import CliSettings
    from sdk_scripts.export_masks import image_fetcher

    fetcher = image_fetcher(CliSettings(label_studio_api_key=ls.legacy_token), ls.url, gcs_direct=False)
    with pytest.raises(ForbiddenImageSource):
        fetcher.fetch_bytes(disagreeing_urls(attacker.port, host_of(ls.url))["backslash before @"], 1)
    assert fetcher.fetch_bytes("/data/upload/1/a.png", 1) == LS_PNG
    assert attacker.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "http://h:1\\@ls:2/x",
        "http://a@b@c/x",
        "http://user:pw@ls/x",
        "http://ls\t/x",
        "http://ls /x",
        "http://xn--ls-\u00e9.example/x",
        "http://ls:0/x",
        "http://ls:99999/x",
        "http://[::1%25eth0]/x",
        "http://ls:/x",
    ],
)
def test_urls_parsers_could_read_differently_are_refused(url):
    with pytest.raises(ForbiddenImageSource):
        image_sources.parse_fetch_url(url)


@pytest.mark.parametrize(
    "url, origin",
    [
        ("http://LS.example:8080/data/upload/a b.png", ("http", "ls.example", 8080)),
        ("https://cdn.example/a.png?d=C:\\images\\a.png", ("https", "cdn.example", 443)),
        ("http://[::1]:9000/a.png#frag", ("http", "::1", 9000)),
        ("http://label_studio:8080/data/local-files/?d=x/y.png", ("http", "label_studio", 8080)),
    ],
)
def test_plain_urls_are_parsed_to_the_origin_they_connect_to(url, origin):
    target = image_sources.parse_fetch_url(url)
    assert target.origin == origin and "#" not in target.url


# ============================================================================ 2. /setup hijack


def test_a_later_setup_cannot_move_label_studio_or_swap_its_token(ls, attacker, tmp_path):
    attacker_token = "a" * 40
    with fetch_only_client(base_settings(tmp_path)) as client:  # no LABEL_STUDIO_URL, no basic auth
        first = payloads.setup_body(hostname=ls.url, access_token=ls.legacy_token)
        hijack = payloads.setup_body(hostname=attacker.url, access_token=attacker_token)
        assert client.post("/setup", json=first).status_code == 200
        assert client.post("/setup", json=hijack).status_code == 200
        response = predict(client, "/data/upload/1/a.png", task_id=7)
        health = client.get("/health")
    assert response.status_code == 200, describe(response)
    assert attacker.requests == [], f"{len(attacker.requests)} fetch(es) went to the hijacker"
    assert [r.headers.get("Authorization") for r in ls.server.requests if r.path == "/data/upload/1/a.png"] == [
        f"Token {ls.legacy_token}"
    ]
    assert health.json()["label_studio_setup"] == {
        "url_from": "first /setup",
        "refused_hostnames": 1,
        "refused_tokens": 1,
    }
    assert ls.legacy_token not in health.text and attacker_token not in health.text


def test_a_setup_hostname_is_ignored_when_label_studio_url_is_set(ls, attacker, tmp_path):
    fetcher = make_fetcher(tmp_path, label_studio_url=ls.url)
    fetcher.label_studio.configure(hostname=attacker.url, access_token=ls.legacy_token)  # the first token is taken
    assert fetcher.fetch_bytes("/data/upload/1/a.png", 1) == LS_PNG
    fetcher.label_studio.configure(hostname=attacker.url, access_token="b" * 40)  # a different one from elsewhere: not
    assert fetcher.label_studio.auth().headers() == {"Authorization": f"Token {ls.legacy_token}"}
    assert attacker.requests == []


def test_cached_bytes_are_never_served_for_another_origin_even_after_a_restart(ls, attacker, tmp_path):
    cache = dict(image_cache_mb=8, image_cache_dir=tmp_path / "shared-cache")
    hijacked = ImageFetcher(base_settings(tmp_path, label_studio_api_key=ls.legacy_token, **cache))
    hijacked.label_studio.configure(hostname=attacker.url)  # the attacker's /setup came first
    assert hijacked.fetch_bytes("/data/upload/1/a.png", 1) == ATTACKER_PNG
    restarted = ImageFetcher(
        base_settings(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.legacy_token, **cache)
    )
    assert restarted.fetch_bytes("/data/upload/1/a.png", 1) == LS_PNG, "the attacker's cached bytes were served"
    assert restarted.cache_key("/data/upload/1/a.png", 1) != hijacked.cache_key("/data/upload/1/a.png", 1)


# ============================================================================== 4. slow hosts


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_host_dripping_one_byte_per_second_is_cut_at_the_deadline(tmp_path, part):
    deadline_s = 2.0
    outcome: list = []
    with drip_host(part) as drip:
        fetcher = make_fetcher(
            tmp_path,
            image_allowed_hosts=(drip.netloc,),
            image_fetch_timeout_s=1.5,
            image_fetch_retries=2,
            image_fetch_deadline_s=deadline_s,
        )

        def fetch():
            try:
                outcome.append(fetcher.fetch_bytes(f"{drip.url}/slow.png", 1))
            except Exception as error:
                outcome.append(error)

        started = time.monotonic()
        worker = threading.Thread(target=fetch, daemon=True)
        worker.start()
        worker.join(timeout=deadline_s + 3)
        held = time.monotonic() - started
    assert outcome, f"the fetch was still held after {held:.1f} s (deadline {deadline_s} s)"
    assert isinstance(outcome[0], ImageUnavailable) and "IMAGE_FETCH_DEADLINE" in outcome[0].message, outcome
    assert held < deadline_s + 1.0, f"held {held:.1f} s"


def test_slow_hosts_cannot_starve_requests_for_other_hosts(tmp_path):
    """42 requests for a dripping host (more than the 40 worker threads) and then one for a good host."""
    slow_requests, per_host = 42, 4
    answers: list[int] = []
    with drip_host("body") as drip, HttpHost({"/good.png": LS_PNG}) as images:
        settings = base_settings(
            tmp_path,
            image_allowed_hosts=(drip.netloc, images.netloc),
            image_fetch_timeout_s=2,
            image_fetch_deadline_s=2,
            image_fetch_per_host=per_host,
            image_fetch_queue_wait_s=0.3,
        )
        with fetch_only_client(settings) as client:

            def slow(task_id: int) -> None:
                answers.append(predict(client, f"{drip.url}/slow-{task_id}.png", task_id).status_code)

            slow_threads = [threading.Thread(target=slow, args=(i,), daemon=True) for i in range(slow_requests)]
            for thread in slow_threads:
                thread.start()
            time.sleep(0.5)  # let them fill what they can
            good: list = []
            started = time.monotonic()
            probe = threading.Thread(
                target=lambda: good.append(predict(client, f"{images.url}/good.png", 999)), daemon=True
            )
            probe.start()
            probe.join(timeout=6)
            waited = time.monotonic() - started
            connections = len(drip.requests)
            for thread in slow_threads:
                thread.join(timeout=6)
    assert good, f"a request for a good host was still waiting after {waited:.1f} s"
    assert good[0].status_code == 200 and waited < 2.0, (good[0].status_code, waited)
    assert connections <= per_host, f"{connections} fetches from one slow host ran at once"
    assert answers.count(503) >= slow_requests - per_host, answers


# ========================================================================= 8. secrets in answers


def test_a_password_in_label_studio_url_never_reaches_an_answer(ls, tmp_path):
    password = "pw-Zq81vXk2"
    url = f"http://backend:{password}@{host_of(ls.url)}"
    settings = base_settings(tmp_path, label_studio_url=url, label_studio_api_key="f" * 40)
    with fetch_only_client(settings) as client:
        response = predict(client, "/data/upload/1/a.png")
        time.sleep(0.3)  # let the Label Studio probe report
        health = client.get("/health")
    assert response.status_code == 422, describe(response)  # Label Studio answered 401
    assert "refused access" in response.json()["error"]
    for answer in (response, health):
        assert password not in answer.text and "f" * 40 not in answer.text, answer.text


def test_every_error_answer_is_redacted_like_a_log_line():
    from backends.server.guard import error_response

    token = "0123456789abcdef0123456789abcdef01234567"
    answer = error_response(
        400, f"bad: Authorization: Token {token} at http://u:secret-pw@h/x", details=[{"field": f"token={token}"}]
    )
    assert token not in answer.body.decode() and "secret-pw" not in answer.body.decode()


# ================================================================ 11b. local-files 403


def test_a_403_from_local_files_names_local_file_serving_not_the_token(ls, tmp_path):
    ls.files["/data/local-files/?d=images/a.png"] = Reply(
        403, b"Serving local files can be dangerous, so it's disabled by default.", {"Content-Type": "text/html"}
    )
    fetcher = make_fetcher(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.legacy_token)
    with pytest.raises(ImageUnavailable) as info:
        fetcher.fetch_bytes("/data/local-files/?d=images/a.png", 1)
    message = info.value.message
    assert "LOCAL_FILES_SERVING_ENABLED" in message and "LOCAL_FILES_DOCUMENT_ROOT" in message, message
    assert "token" not in message.lower(), message
