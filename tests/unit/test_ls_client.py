"""LabelStudioClient.get_json against a loopback Label Studio: auth, one refresh after a 401, errors."""

from __future__ import annotations

import pytest

from backends.errors import LabelStudioUnavailable
from backends.label_studio.client import LabelStudioClient
from backends.settings import Settings
from tests.support.label_studio import FakeLabelStudio


@pytest.fixture
def ls():
    with FakeLabelStudio() as server:
        server.projects[7] = "<View/>"
        server.exports[7] = [{"id": 1, "annotations": []}]
        yield server


def client_for(url: str, api_key: str) -> LabelStudioClient:
    return LabelStudioClient(Settings(label_studio_url=url, label_studio_api_key=api_key, image_fetch_timeout_s=2.0))


def test_get_json_with_a_legacy_token(ls):
    client = client_for(ls.url, ls.legacy_token)
    assert client.get_json("/api/projects/7/export", {"exportType": "JSON"}) == [{"id": 1, "annotations": []}]
    request = ls.server.requests[-1]
    assert request.headers["Authorization"] == f"Token {ls.legacy_token}"
    assert request.query == {"exportType": ["JSON"]}


def test_get_json_refreshes_a_personal_access_token_once_after_a_401(ls):
    client = client_for(ls.url, ls.pat)
    assert client.get_json("/api/projects/7")
    ls.revoke_access()  # Label Studio restarted: the access token it issued is no longer valid
    assert client.get_json("/api/projects/7/export") == [{"id": 1, "annotations": []}]
    assert ls.refreshes == 2


def test_get_json_says_what_is_missing_or_wrong(ls):
    with pytest.raises(LabelStudioUnavailable, match="URL or API key is unknown"):
        client_for("", "").get_json("/api/projects/7")
    with pytest.raises(LabelStudioUnavailable, match="URL or API key is unknown"):
        client_for(ls.url, "").get_json("/api/projects/7")
    ls.export_status = 500
    with pytest.raises(LabelStudioUnavailable, match="HTTP 500"):
        client_for(ls.url, ls.legacy_token).get_json("/api/projects/7/export")
    with pytest.raises(LabelStudioUnavailable, match="HTTP 401"):
        client_for(ls.url, "f" * 40).get_json("/api/projects/7")


def test_setup_values_configure_the_client_until_settings_name_label_studio(ls):
    client = client_for("", "")
    client.configure(hostname=ls.url, access_token=ls.legacy_token)
    assert client.url == ls.url
    assert client.get_json("/api/projects/7") is not None
    assert client.setup_report() == {"url_from": "first /setup", "refused_hostnames": 0, "refused_tokens": 0}
