"""LabelStudioAuth against a real loopback token endpoint issuing short-lived JWTs."""

from __future__ import annotations

import threading
import time

import pytest

from backends.errors import ImageUnavailable, LabelStudioUnavailable
from backends.label_studio.auth import LabelStudioAuth
from tests.support.http_host import closed_port_url
from tests.support.label_studio import FakeLabelStudio, make_jwt


class FakeClock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ls():
    with FakeLabelStudio(access_lifetime_s=300) as server:
        yield server


def test_recognises_personal_access_tokens():
    assert LabelStudioAuth.is_personal_access_token(make_jwt({"token_type": "refresh", "exp": 1}))
    assert LabelStudioAuth.is_personal_access_token("Bearer " + make_jwt({"exp": 1}))
    assert not LabelStudioAuth.is_personal_access_token("0123456789abcdef0123456789abcdef01234567")
    assert not LabelStudioAuth.is_personal_access_token("a.b.c")
    assert not LabelStudioAuth.is_personal_access_token("")


def test_legacy_token_header_needs_no_request(ls):
    auth = LabelStudioAuth(ls.url, ls.legacy_token)
    assert auth.headers() == {"Authorization": f"Token {ls.legacy_token}"}
    auth.on_unauthorized()
    assert auth.headers() == {"Authorization": f"Token {ls.legacy_token}"}
    assert ls.server.requests == []


def test_key_pasted_with_its_scheme_is_accepted(ls):
    assert LabelStudioAuth(ls.url, f"Token {ls.legacy_token}").headers() == {
        "Authorization": f"Token {ls.legacy_token}"
    }


def test_pat_is_exchanged_for_a_bearer_access_token_and_reused(ls):
    clock = FakeClock()
    auth = LabelStudioAuth(ls.url + "/", ls.pat, clock=clock)
    first = auth.headers()
    assert first["Authorization"].startswith("Bearer ")
    assert first["Authorization"] != f"Bearer {ls.pat}"
    assert first["Authorization"][len("Bearer ") :] in ls.issued
    clock.now += 60  # well before expiry: no new refresh
    assert auth.headers() == first
    assert ls.refreshes == 1
    assert ls.server.requests[0].json() == {"refresh": ls.pat}


def test_pat_is_refreshed_before_expiry(ls):
    clock = FakeClock()
    auth = LabelStudioAuth(ls.url, ls.pat, clock=clock)
    first = auth.headers()
    clock.now += 290  # 10 s before the 300 s expiry: inside the refresh margin
    second = auth.headers()
    assert ls.refreshes == 2
    assert second != first


def test_pat_is_refreshed_after_expiry_with_real_short_lived_tokens():
    with FakeLabelStudio(access_lifetime_s=2) as ls:
        auth = LabelStudioAuth(ls.url, ls.pat)
        auth.headers()
        auth.headers()
        assert ls.refreshes == 1
        time.sleep(2.1)
        auth.headers()
        assert ls.refreshes == 2


def test_unauthorized_forces_a_new_refresh(ls):
    clock = FakeClock()
    auth = LabelStudioAuth(ls.url, ls.pat, clock=clock)
    first = auth.headers()
    ls.revoke_access()
    auth.on_unauthorized()
    second = auth.headers()
    assert ls.refreshes == 2
    assert second != first and second["Authorization"][len("Bearer ") :] in ls.issued


def test_concurrent_callers_share_one_refresh(ls):
    auth = LabelStudioAuth(ls.url, ls.pat)
    results = []
    threads = [threading.Thread(target=lambda: results.append(auth.headers())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ls.refreshes == 1
    assert len({r["Authorization"] for r in results}) == 1


def test_rejected_pat_gives_a_clear_error_without_the_key(ls):
    wrong = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 999, "jti": "other"})
    auth = LabelStudioAuth(ls.url, wrong)
    with pytest.raises(ImageUnavailable) as info:
        auth.headers()
    assert "rejected the personal access token" in info.value.message
    assert wrong not in info.value.message


def test_label_studio_down_during_refresh():
    auth = LabelStudioAuth(closed_port_url(), make_jwt({"exp": 1}), timeout_s=1)
    with pytest.raises(LabelStudioUnavailable, match="did not answer"):
        auth.headers()


def test_repr_never_shows_the_key(ls):
    for key in (ls.legacy_token, ls.pat):
        auth = LabelStudioAuth(ls.url, key)
        assert key not in repr(auth) and key not in str(auth)
        assert ls.url in repr(auth)
