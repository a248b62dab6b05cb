"""Security properties, each tested so that the test fails without the protection.

- Secrets (legacy token, personal access token and the access tokens it is exchanged for, basic
  auth password, GCS service-account key, URL signatures and tokens, predict passwords) never
  appear in any log line of real `python -m sam` / `python -m segmentation` processes at DEBUG,
  while the log shows that there was something to redact.
- Image fetches obey the allow-list through /predict: no file://, no link-local / metadata
  addresses (even when allow-listed), no other loopback port, no redirect out of the list; the
  Label Studio token goes to Label Studio only.
- Body limits admit a 5 MB interactive request and refuse more than MAX_REQUEST_MB (declared or
  streamed); basic auth guards every endpoint when configured.
- Checkpoints never run code: a pickle that creates a marker file when loaded with
  weights_only=False is refused by the SAM engine loader and the segmentation version loader.
- Exported file names cannot escape the output folder.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import shutil
import subprocess
import sys

import numpy as np
import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from backends.logs import RedactingFilter
from tests.reliability.backend_process import BackendProcess
from tests.reliability.checks import check_answer, check_healthy, describe, fuzz_settings
from tests.reliability.conftest import base_settings, sam_client, segmentation_client
from tests.reliability.models import save_constant_segmentation_model, save_malicious_checkpoint
from tests.support import payloads
from tests.support.engines import BOX_ENGINE
from tests.support.http_host import PNG, HttpHost, Reply
from tests.support.images import png, quadrant_rgb
from tests.support.label_studio import FakeLabelStudio

GOOD_PNG = png(quadrant_rgb(24, 32))
BOX = payloads.rectangle(25, 25, 50, 50, original=(32, 24))


# =============================================================================== log redaction


def service_account_key() -> dict:
    """A GCS service-account key file's content with a real (fresh) RSA private key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {
        "type": "service_account",
        "project_id": "reliability-test",
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": "backend@reliability-test.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": "http://127.0.0.1:9/token",
    }


def secret_fragments(secret: str) -> list[str]:
    """What must not appear in a log: the secret, and each long line of it (PEM bodies)."""
    pieces = [secret] + [line for line in secret.splitlines() if len(line) >= 16 and "PRIVATE KEY" not in line]
    return [piece for piece in pieces if piece]


@pytest.fixture(scope="module")
def leaky_world(tmp_path_factory):
    """A Label Studio stand-in (PAT and legacy token), an image host, and the secrets."""
    tmp = tmp_path_factory.mktemp("secrets")
    fake = FakeLabelStudio(access_lifetime_s=60)
    fake.legacy_token = secrets.token_hex(20)
    fake.files["/data/upload/1/good.png"] = Reply(200, GOOD_PNG, PNG)
    fake.resolve["gs://bucket/good.png"] = Reply(200, GOOD_PNG, PNG)
    key = service_account_key()
    key_file = tmp / "service-account.json"
    key_file.write_text(json.dumps(key))
    with fake, HttpHost({"/good.png": GOOD_PNG}) as images:
        yield {
            "fake": fake,
            "images": images,
            "tmp": tmp,
            "key": key,
            "key_file": key_file,
            "basic_user": "labelstudio",
            "basic_pass": "pw-" + secrets.token_urlsafe(18),
            "signature": secrets.token_hex(32),
            "url_token": "tk" + secrets.token_hex(16),
            "predict_password": "pw-" + secrets.token_urlsafe(12),
        }


def _drive(process: BackendProcess, world: dict, backend: str) -> None:
    """Requests as Label Studio and careless clients send them, many of them failing."""
    fake, images = world["fake"], world["images"]
    auth = (world["basic_user"], world["basic_pass"])
    url = process.url
    with requests.Session() as http:
        # auth failures
        assert http.get(f"{url}/health", timeout=5).status_code == 401
        assert (
            http.get(f"{url}/health", auth=(world["basic_user"], world["basic_pass"] + "x"), timeout=5).status_code
            == 401
        )
        http.auth = auth
        check_healthy(lambda path: http.get(url + path, timeout=5))
        # /setup hands over the legacy token, a key in extra_params, and a hostname with credentials
        setup = payloads.setup_body(
            access_token=fake.legacy_token,
            hostname=f"http://admin:{world['basic_pass']}@localhost:8080",
            extra_params={"gcs_key": world["key"], "api_key": fake.legacy_token},
        )
        assert http.post(f"{url}/setup", json=setup, timeout=10).status_code == 200
        # bodies that fail validation or parsing while carrying secrets
        assert (
            http.post(
                f"{url}/setup", json={"project": {"token": fake.legacy_token}, "schema": 5}, timeout=5
            ).status_code
            == 422
        )
        broken = b'{"access_token": "' + fake.legacy_token.encode() + b'", "schema": '
        assert (
            http.post(f"{url}/setup", data=broken, headers={"Content-Type": "application/json"}, timeout=5).status_code
            == 400
        )
        signed = (
            f"{images.url}/good.png?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature={world['signature']}"
            f"&token={world['url_token']}"
        )
        uris = [
            "/data/upload/1/good.png",
            "/data/upload/1/missing.png",
            "gs://bucket/good.png",
            signed,
            f"{images.url}/missing.png?X-Goog-Signature={world['signature']}",
            "file:///etc/passwd",
            f"http://user:{world['basic_pass']}@127.0.0.1:1/x.png",
        ]
        for index, uri in enumerate(uris):
            tasks = [payloads.task(10 + index, uri)]
            context = {"result": [BOX]} if backend == "sam" else None
            body = payloads.predict_body(tasks, context, login=world["basic_user"], password=world["predict_password"])
            check_answer(http.post(f"{url}/predict", json=body, timeout=30))
            if index == 1:
                fake.revoke_access()  # the next PAT use gets a 401 and refreshes its access token
        webhook = {
            "action": "START_TRAINING",
            "project": {"id": 1, "label_config": payloads.LABEL_CONFIG, "token": fake.legacy_token},
        }
        assert http.post(f"{url}/webhook", json=webhook, timeout=5).status_code == 200
        assert http.get(f"{url}/metrics", timeout=5).status_code == 200


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["sam", "segmentation"])
def test_no_secret_reaches_the_logs_of_a_real_backend(leaky_world, backend, tmp_path, constant_model):
    world, fake = leaky_world, leaky_world["fake"]
    env = {
        "LABEL_STUDIO_URL": fake.url,
        "LOG_LEVEL": "DEBUG",
        "BASIC_AUTH_USER": world["basic_user"],
        "BASIC_AUTH_PASS": world["basic_pass"],
        "IMAGE_ALLOWED_HOSTS": f"{world['images'].netloc},127.0.0.1:1",
        "IMAGE_FETCH_RETRIES": "1",
        "IMAGE_FETCH_TIMEOUT": "2",
        "IMAGE_CACHE_DIR": str(tmp_path / "cache"),
        "MODEL_DIR": str(tmp_path / "models"),
        "GOOGLE_APPLICATION_CREDENTIALS": str(world["key_file"]),
        "DEVICE": "cpu",
    }
    if backend == "sam":  # the PAT from the environment; the legacy token arrives through /setup
        env |= {"SAM_ENGINE": BOX_ENGINE, "LABEL_STUDIO_API_KEY": fake.pat}
    else:
        env |= {"SEG_CHECKPOINT": str(constant_model), "TRAIN_EVERY": "1", "TRAIN_MINUTES": "0.05"}
    process = BackendProcess(backend, env, tmp_path / f"{backend}.log", auth=(world["basic_user"], world["basic_pass"]))
    with process:
        _drive(process, world, backend)
    log = process.log()

    secrets_to_find = {
        "legacy token": fake.legacy_token,
        "personal access token": fake.pat,
        "basic auth password": world["basic_pass"],
        "GCS private key": world["key"]["private_key"],
        "GCS private key id": world["key"]["private_key_id"],
        "URL signature": world["signature"],
        "URL token": world["url_token"],
        "predict password": world["predict_password"],
        "basic auth header": base64.b64encode(f"{world['basic_user']}:{world['basic_pass']}".encode()).decode(),
    }
    secrets_to_find |= {f"issued access token {i}": token for i, token in enumerate(fake.issued)}
    if backend == "sam":
        assert fake.refreshes >= 2, "the PAT was exchanged, and refreshed after the revocation"
    leaks = [
        (name, line)
        for name, secret in secrets_to_find.items()
        for line in log.splitlines()
        if any(piece in line for piece in secret_fragments(secret))
    ]
    assert not leaks, f"secrets in the {backend} log: " + "; ".join(f"{name}: {line[:300]}" for name, line in leaks[:5])
    # The scan looked at a verbose log with fetched URLs in it, and something had to be redacted.
    assert "DEBUG" in log and "/predict" in log and "good.png" in log, log[-3000:]
    assert "[REDACTED]" in log, log[-3000:]


def test_without_the_redacting_filter_the_secret_would_be_logged(tmp_path):
    """Control: the fetcher's HTTP library logs signed URLs in full at DEBUG; only the filter keeps
    the signature out (so the scan above can fail)."""
    signature, token = secrets.token_hex(32), "tk" + secrets.token_hex(16)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            # A copy as it is now: handlers further up (the root's redacting filter, once another
            # test has configured logging) edit records in place.
            records.append(logging.makeLogRecord(dict(record.__dict__)))

    handler, urllib3_log = Keep(level=logging.DEBUG), logging.getLogger("urllib3")
    level = urllib3_log.level
    urllib3_log.addHandler(handler)
    urllib3_log.setLevel(logging.DEBUG)
    try:
        with (
            HttpHost({"/good.png": GOOD_PNG}) as images,
            sam_client(base_settings(tmp_path, sam_engine=BOX_ENGINE, image_allowed_hosts=(images.netloc,))) as client,
        ):
            uri = f"{images.url}/good.png?X-Goog-Signature={signature}&token={token}"
            response = client.post("/predict", json=payloads.predict_body([payloads.task(1, uri)], {"result": [BOX]}))
            assert response.status_code == 200, describe(response)
    finally:
        urllib3_log.removeHandler(handler)
        urllib3_log.setLevel(level)
    raw = [record.getMessage() for record in records]
    assert any(signature in message and token in message for message in raw), raw
    redacting = RedactingFilter()
    for record in records:
        redacting.filter(record)
        assert signature not in record.getMessage() and token not in record.getMessage()


# =============================================================================== fetch allow-list


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """SAM backend allowing only the image host (and, to show the metadata rule wins, 169.254.169.254);
    an internal loopback service on another port that must never be contacted."""
    tmp = tmp_path_factory.mktemp("allow-list")
    fake = FakeLabelStudio()
    fake.files["/data/upload/1/good.png"] = Reply(200, GOOD_PNG, PNG)
    with (
        fake,
        HttpHost({"/good.png": GOOD_PNG}) as images,
        HttpHost(app=lambda request: Reply(200, GOOD_PNG, PNG)) as internal,
    ):
        images.add("/to-internal", Reply(302, b"", {"Location": f"{internal.url}/good.png"}))
        images.add("/to-metadata", Reply(307, b"", {"Location": "http://169.254.169.254/computeMetadata/v1/"}))
        settings = base_settings(
            tmp,
            sam_engine=BOX_ENGINE,
            label_studio_url=fake.url,
            label_studio_api_key=fake.legacy_token,
            image_allowed_hosts=(images.netloc, "169.254.169.254", "metadata.google.internal"),
        )
        with sam_client(settings) as client:
            yield {"client": client, "images": images, "internal": internal, "fake": fake}


FORBIDDEN = [
    "file:///etc/passwd",
    "file://localhost/etc/passwd",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://2852039166/latest/meta-data/",
    "http://0xA9FEA9FE/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "ftp://127.0.0.1/good.png",
    "//127.0.0.1/good.png",
]


@pytest.mark.parametrize("uri", FORBIDDEN)
def test_forbidden_sources_are_refused(guarded, uri):
    body = payloads.predict_body([payloads.task(1, uri)], {"result": [BOX]})
    response = guarded["client"].post("/predict", json=body)
    check_answer(response)
    assert response.status_code == 403, describe(response)


@pytest.mark.parametrize("target", ["internal-port", "localhost-name", "redirect"])
def test_loopback_services_outside_the_allow_list_are_never_contacted(guarded, target):
    internal, images = guarded["internal"], guarded["images"]
    uri = {
        "internal-port": f"{internal.url}/good.png",  # allowed host, other port
        "localhost-name": f"http://localhost:{internal.port}/good.png",
        "redirect": f"{images.url}/to-internal",
    }[target]
    body = payloads.predict_body([payloads.task(2, uri)], {"result": [BOX]})
    response = guarded["client"].post("/predict", json=body)
    assert response.status_code == 403, describe(response)
    assert "IMAGE_ALLOWED_HOSTS" in response.json()["error"]
    assert internal.requests == []


def test_redirect_to_metadata_is_refused_even_when_allow_listed(guarded):
    body = payloads.predict_body([payloads.task(3, f"{guarded['images'].url}/to-metadata")], {"result": [BOX]})
    response = guarded["client"].post("/predict", json=body)
    assert response.status_code == 403 and "metadata" in response.json()["error"], describe(response)


def test_label_studio_token_goes_to_label_studio_only(guarded):
    client, images, fake = guarded["client"], guarded["images"], guarded["fake"]
    for task_id, uri in ((4, "/data/upload/1/good.png"), (5, f"{images.url}/good.png")):
        response = client.post("/predict", json=payloads.predict_body([payloads.task(task_id, uri)], {"result": [BOX]}))
        assert response.status_code == 200, describe(response)
    assert [r.headers.get("Authorization") for r in fake.server.requests if r.path == "/data/upload/1/good.png"] == [
        f"Token {fake.legacy_token}"
    ]
    assert all("Authorization" not in request.headers for request in images.requests)


def test_direct_gcs_read_fails_within_the_fetch_timeout(monkeypatch, tmp_path):
    import threading

    from backends.images.fetcher import ImageFetcher
    from backends.settings import Settings

    key_file = tmp_path / "key.json"
    key_file.write_text(json.dumps(service_account_key()))  # token_uri: a closed loopback port
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing leaves the machine
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    fetcher = ImageFetcher(
        Settings(gcs_direct_read=True, image_cache_mb=0, image_fetch_timeout_s=1.0, image_fetch_retries=0)
    )
    outcome: list = []

    def fetch():
        try:
            fetcher.fetch_bytes("gs://bucket/x.png")
        except Exception as error:
            outcome.append(error)

    worker = threading.Thread(target=fetch, daemon=True)  # left to finish on its own if it hangs
    worker.start()
    worker.join(timeout=4 * 1.0 + 5)
    assert outcome, "the direct GCS read was still retrying after 9 s (IMAGE_FETCH_TIMEOUT=1)"
    assert getattr(outcome[0], "status", None) == 422


# =============================================================================== body limits and auth


def big_interactive_body(megabytes: float, image_url: str) -> bytes:
    """An interactive /predict whose task carries annotations with large brush RLE (as Label Studio
    sends them), padded to about `megabytes` MiB."""
    rng = np.random.default_rng(0)
    region = payloads.brush(rng.random((256, 256)) > 0.5)
    task = payloads.task(1, image_url)
    body = payloads.predict_body([task], {"result": [BOX]})
    size_of_one = len(json.dumps(region))
    task["annotations"] = [{"id": 1, "result": [region] * max(1, round(megabytes * 2**20 / size_of_one))}]
    encoded = json.dumps(body).encode()
    assert abs(len(encoded) / 2**20 - megabytes) < 0.2, len(encoded)
    return encoded


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    with HttpHost({"/good.png": GOOD_PNG}) as images:
        settings = base_settings(
            tmp_path_factory.mktemp("limits"),
            sam_engine=BOX_ENGINE,
            max_request_mb=8,
            image_allowed_hosts=(images.netloc,),
            basic_auth_user="ls",
            basic_auth_pass="s3cret-pass",
        )
        with sam_client(settings) as client:
            client.auth = ("ls", "s3cret-pass")
            yield client, images


def test_a_5_mb_interactive_request_is_admitted(limited):
    client, images = limited
    body = big_interactive_body(5, f"{images.url}/good.png")
    response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, describe(response)
    assert response.json()["results"][0]["result"][0]["type"] == "brushlabels"


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_max_request_mb_is_refused(limited, streamed):
    client, images = limited
    body = big_interactive_body(9, f"{images.url}/good.png")
    content = (body[i : i + 2**20] for i in range(0, len(body), 2**20)) if streamed else body
    response = client.post("/predict", content=content, headers={"Content-Type": "application/json"})
    check_answer(response)
    assert response.status_code == 413 and "MAX_REQUEST_MB" in response.json()["error"], describe(response)
    check_healthy(client.get)


@pytest.mark.parametrize(
    "endpoint", ["/health", "/", "/setup", "/predict", "/webhook", "/versions", "/metrics", "/docs"]
)
@pytest.mark.parametrize("credentials", ["none", "wrong-password", "wrong-user", "not-basic", "garbage"])
def test_basic_auth_guards_every_endpoint(limited, endpoint, credentials):
    client, _ = limited
    header = {
        "none": None,
        "wrong-password": "Basic " + base64.b64encode(b"ls:s3cret-pasS").decode(),
        "wrong-user": "Basic " + base64.b64encode(b"LS:s3cret-pass").decode(),
        "not-basic": "Bearer s3cret-pass",
        "garbage": "Basic !!!not-base64!!!",
    }[credentials]
    method = "GET" if endpoint in ("/health", "/", "/versions", "/metrics", "/docs") else "POST"
    response = client.request(
        method,
        endpoint,
        auth=None,
        headers={"Authorization": header} if header else {},
        json={} if method == "POST" else None,
    )
    assert response.status_code == 401, describe(response)
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    check_answer(response)
    assert client.request(method, endpoint, json={} if method == "POST" else None).status_code != 401


# =============================================================================== checkpoints


@pytest.fixture
def malicious(tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = save_malicious_checkpoint(tmp_path / "evil.pth", marker)
    return checkpoint, marker


def test_the_malicious_checkpoint_really_runs_code_when_unpickled(malicious, tmp_path):
    """Control, in a child process: torch.load(weights_only=False) creates the marker."""
    checkpoint, _ = malicious
    control = tmp_path / "control-ran"
    save_malicious_checkpoint(checkpoint.with_name("control.pth"), control)
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
            str(checkpoint.with_name("control.pth")),
        ],
        check=False,
        capture_output=True,
        timeout=120,
    )
    assert control.exists()


@pytest.mark.parametrize("engine", ["sam", "auto"])
def test_sam_engine_loader_refuses_a_malicious_checkpoint(malicious, engine):
    from backends.settings import Settings
    from sam.engines import load_engine

    checkpoint, marker = malicious
    settings = Settings(sam_engine=engine, sam_checkpoint=str(checkpoint), sam_model_type="vit_tiny", device="cpu")
    with pytest.raises(Exception, match="(?i)weights only|unpickl|unsupported"):
        load_engine(settings)
    assert not marker.exists()


def test_segmentation_version_loader_refuses_a_malicious_checkpoint(malicious, tmp_path):
    from segmentation.versions import load_version

    checkpoint, marker = malicious
    version = save_constant_segmentation_model(tmp_path / "models")
    shutil.copy(checkpoint, version / "weights.pt")
    with pytest.raises(Exception, match="(?i)weights only|unpickl|unsupported"):
        load_version(version)
    assert not marker.exists()


def test_segmentation_backend_starts_without_a_refused_checkpoint(malicious, tmp_path):
    checkpoint, marker = malicious
    version = save_constant_segmentation_model(tmp_path / "models")
    shutil.copy(checkpoint, version / "weights.pt")
    try:
        with segmentation_client(base_settings(tmp_path / "serve", seg_checkpoint=str(version))) as client:
            report = check_healthy(client.get)
            assert report["model_state"] == "no model"
            assert "UnpicklingError" in report["fallback_model_error"]  # /health says why
    finally:
        assert not marker.exists()


@pytest.mark.e2e
def test_sam_process_with_a_malicious_checkpoint_exits_with_a_clear_error(malicious, tmp_path):
    checkpoint, marker = malicious
    env = {
        "SAM_ENGINE": "sam",
        "SAM_CHECKPOINT": str(checkpoint),
        "SAM_MODEL_TYPE": "vit_tiny",
        "DEVICE": "cpu",
        "IMAGE_CACHE_DIR": str(tmp_path / "cache"),
    }
    process = BackendProcess("sam", env, tmp_path / "sam.log")
    with pytest.raises(RuntimeError, match="did not start"):
        process.start(timeout_s=120)
    assert process.process.returncode not in (None, 0)
    assert re.search("(?i)weights only load failed", process.log())
    assert not marker.exists()


# =============================================================================== exported file names


HOSTILE_NAMES = [
    "../../etc/passwd.png",
    "/etc/shadow",
    "gs://bucket/a/../../../root/.ssh/id_rsa.png",
    "..",
    ".",
    "...",
    "C:\\Windows\\System32\\evil.png",
    "..\\..\\evil.png",
    "/data/upload/1/%2e%2e%2fescape.png",
    "a/b/../../../c.png",
    "name\x00.png",
    ".hidden.png",
    "~/x.png",
    "con",
    "",
    " ",
    "\u202e\u0301gnp.exe",
    "x" * 500 + ".png",
    "/data/local-files/?d=../../../etc/passwd",
    "http://host/../../x.png?X-Goog-Signature=abc",
]
SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


@given(name=st.one_of(st.text(max_size=80), st.sampled_from(HOSTILE_NAMES)))
@fuzz_settings(500)
def test_safe_stem_never_leaves_the_folder(name):
    from sdk_scripts.common import safe_stem

    stem = safe_stem(name)
    assert SAFE_NAME.match(stem) and stem not in (".", "..") and len(stem) <= 120, (name, stem)


def test_export_writes_only_inside_the_output_folder(tmp_path):
    from sdk_scripts.export_masks import export_project

    labels = ["../../Nucleus", "/abs/Cell", "..\\x"]
    config = (
        '<View><Image name="image" value="$image"/><PolygonLabels name="p" toName="image">'
        + "".join(f'<Label value="{label}"/>' for label in labels)
        + "</PolygonLabels></View>"
    )
    square = [[10, 10], [60, 10], [60, 60], [10, 60]]
    tasks = [
        {
            "id": task_id,
            "data": {"image": name},
            "annotations": [
                {
                    "id": task_id,
                    "was_cancelled": False,
                    "result": [
                        {
                            "type": "polygonlabels",
                            "from_name": "p",
                            "to_name": "image",
                            "original_width": 16,
                            "original_height": 12,
                            "value": {"points": square, "polygonlabels": [labels[task_id % 3]]},
                        }
                    ],
                }
            ],
        }
        for task_id, name in enumerate(HOSTILE_NAMES, start=1)
    ]
    out = tmp_path / "export" / "out"
    summary = export_project(
        tasks, config, out, "later", fetcher=None, with_images=False, progress=False, data_key="image"
    )
    written = [path for path in (tmp_path / "export").rglob("*") if path.is_file()]
    named = [t for t in tasks if t["data"]["image"]]
    assert len(summary.exported) == len(named) and len(summary.skipped) == len(tasks) - len(named), summary
    assert all(path.resolve().is_relative_to(out.resolve()) for path in written), written
    masks = [path for path in written if path.parent.name == "masks"]
    assert len(masks) == len(summary.exported) and len({path.name.lower() for path in masks}) == len(masks)
    for path in masks:
        assert path.parent == out / "masks" and SAFE_NAME.match(path.stem), path
    assert json.loads((out / "label_map.json").read_text()) == {label: i for i, label in enumerate(labels, 1)}
