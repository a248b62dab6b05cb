"""Fuzzing every endpoint of both backends: zero 5xx, every 4xx with a message, still healthy.

Per backend (SamBackend with a deterministic engine; SegmentationBackend with an empty MODEL_DIR
and a tiny fallback model, so /predict really fetches and segments) and per endpoint, at least
1000 generated requests go through the real ASGI app in-process:
- POST /setup, /predict, /webhook: 300 schemathesis cases from the servers' /openapi.json (positive)
  + 200 negative ones (bodies that break the schema, raw bytes) + 500 Label Studio-shaped bodies
  from tests/reliability/strategies.py (images on loopback or refused, NaN/huge/zero-area prompts);
- GET /health, /versions, /metrics: 1000 requests with generated query strings, headers, path
  suffixes and methods (the schema gives these endpoints no parameters to fuzz).
A smaller run repeats the Label Studio-shaped cases over real HTTP against `python -m sam` and
`python -m segmentation`. Bugs found this way are pinned, fixed, by the tests at the end.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import given

from backends.masks.rle import decode_rle
from tests.reliability import strategies
from tests.reliability.backend_process import BackendProcess
from tests.reliability.checks import check_answer, check_healthy, describe, fuzz_settings
from tests.reliability.conftest import base_settings, sam_client, segmentation_client
from tests.support import payloads
from tests.support.engines import BOX_ENGINE
from tests.support.http_host import HttpHost, Reply
from tests.support.images import noisy_rgb, png, quadrant_rgb, truncated
from tests.support.label_studio import FakeLabelStudio

POSITIVE_CASES, NEGATIVE_CASES, SHAPED_CASES, GET_CASES = 300, 200, 500, 1000
HTTP_CASES = 150  # per POST endpoint and backend over real HTTP (each costs a loopback round trip)
POST_ENDPOINTS = ("/setup", "/predict", "/webhook")
GET_ENDPOINTS = ("/health", "/versions", "/metrics")
BACKENDS = ("sam", "segmentation")

sent: collections.Counter = collections.Counter()  # (backend, endpoint) -> requests sent in-process


@dataclasses.dataclass
class World:
    images: HttpHost
    label_studio: object
    clients: dict
    uris: list[str]
    ok_url: str


@pytest.fixture(scope="module")
def world(tmp_path_factory, constant_model):
    tmp = tmp_path_factory.mktemp("fuzz")
    ok_png = png(quadrant_rgb(24, 32))
    with (
        HttpHost(
            {
                "/ok.png": ok_png,
                "/tiny.png": png(np.zeros((1, 1, 3), np.uint8)),
                "/truncated.png": truncated(png(noisy_rgb())),
                "/page.html": Reply(200, b"<html>login</html>"),
            }
        ) as images,
        FakeLabelStudio() as label_studio,
    ):
        label_studio.files["/data/upload/1/ok.png"] = Reply(200, ok_png)
        label_studio.resolve["gs://bucket/ok.png"] = Reply(200, ok_png)
        common = dict(
            label_studio_url=label_studio.url,
            label_studio_api_key=label_studio.legacy_token,
            image_allowed_hosts=(images.netloc,),
        )
        sam_settings = base_settings(tmp / "sam", sam_engine=BOX_ENGINE, **common)
        segmentation_settings = base_settings(tmp / "seg", seg_checkpoint=str(constant_model), **common)
        assert not any((tmp / "seg" / "models").glob("*"))  # MODEL_DIR starts empty
        with sam_client(sam_settings) as sam, segmentation_client(segmentation_settings) as segmentation:
            uris = [
                f"{images.url}{path}" for path in ("/ok.png", "/tiny.png", "/truncated.png", "/page.html", "/404.png")
            ]
            uris += ["/data/upload/1/ok.png", "gs://bucket/ok.png"]
            yield World(images, label_studio, {"sam": sam, "segmentation": segmentation}, uris, f"{images.url}/ok.png")


def still_serving(world: World, backend: str) -> None:
    """/health says UP, and a real prediction on a good image still gives the exact answer."""
    client = world.clients[backend]
    check_healthy(client.get)
    if backend == "sam":
        box = payloads.rectangle(25, 25, 50, 50, original=(32, 24))  # 8..24 x 6..18 px of 32x24
        response = client.post(
            "/predict", json=payloads.predict_body([payloads.task(1, world.ok_url)], {"result": [box]})
        )
        assert response.status_code == 200, describe(response)
        (region,) = response.json()["results"][0]["result"]
        mask = decode_rle(region["value"]["rle"], 24, 32)
        assert mask.sum() == 16 * 12 and mask[6:18, 8:24].all()
    else:
        response = client.post("/predict", json=payloads.predict_body([payloads.task(1, world.ok_url)]))
        assert response.status_code == 200, describe(response)
        (region,) = response.json()["results"][0]["result"]
        assert region["value"]["brushlabels"] == ["Nucleus"]
        assert decode_rle(region["value"]["rle"], 24, 32).all()  # the constant model: Nucleus everywhere


def post_raw(client, endpoint: str, body) -> object:
    """POST `body` as JSON bytes (NaN and Infinity written as bare tokens, as a sloppy client would)."""
    return client.post(endpoint, content=payloads.encode(body), headers={"Content-Type": "application/json"})


# -- schemathesis, from the servers' own OpenAPI schema ---------------------------------------------


def schema_operation(client, method: str, path: str):
    # from_dict, not from_asgi: loading through the app would run (and end) its lifespan again,
    # shutting down the background pool the running app still uses.
    response = client.get("/openapi.json")
    assert response.status_code == 200, describe(response)
    schema = schemathesis.openapi.from_dict(response.json())
    return schema[path][method.upper()]


def send_case(client, case) -> object:
    kwargs = case.as_transport_kwargs()
    kwargs.pop("cookies", None)
    if "data" in kwargs:  # raw (negative) bodies
        data = kwargs.pop("data")
        kwargs["content"] = data if isinstance(data, bytes) else str(data).encode()
    return client.request(**kwargs)


@pytest.mark.parametrize("endpoint", POST_ENDPOINTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_schemathesis_cases(world, backend, endpoint):
    client = world.clients[backend]
    operation = schema_operation(client, "POST", endpoint)
    count = collections.Counter()
    for mode, examples in (
        (schemathesis.GenerationMode.POSITIVE, POSITIVE_CASES),
        (schemathesis.GenerationMode.NEGATIVE, NEGATIVE_CASES),
    ):

        @fuzz_settings(examples)
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            check_answer(send_case(client, case))
            count[mode] += 1  # noqa: B023  run() is called within this iteration
            sent[backend, endpoint] += 1

        run()
        assert count[mode] >= examples, f"only {count[mode]} {mode.value} cases for {endpoint}"
    still_serving(world, backend)


# -- Label Studio-shaped bodies -------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", POST_ENDPOINTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_label_studio_shaped_cases(world, backend, endpoint):
    client = world.clients[backend]
    uris = strategies.image_uris(world.uris)
    bodies = {
        "/setup": strategies.setup_bodies,
        "/predict": strategies.predict_bodies(uris),
        "/webhook": strategies.webhook_bodies(uris),
    }[endpoint]
    count = 0

    @fuzz_settings(SHAPED_CASES)
    @given(body=bodies)
    def run(body):
        nonlocal count
        check_answer(post_raw(client, endpoint, body))
        count += 1
        sent[backend, endpoint] += 1

    run()
    assert count >= SHAPED_CASES
    still_serving(world, backend)


# -- GET endpoints: query strings, headers, path suffixes, other methods ----------------------------


@pytest.mark.parametrize("endpoint", GET_ENDPOINTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_get_endpoint_cases(world, backend, endpoint):
    client = world.clients[backend]
    count = 0

    @fuzz_settings(GET_CASES)
    @given(request=strategies.get_requests)
    def run(request):
        nonlocal count
        response = client.request(
            request["method"],
            endpoint + request["suffix"],
            params=request["params"],
            headers=request["headers"],
            content=request["body"],
        )
        check_answer(response)
        if request["method"] == "GET" and request["suffix"] == "" and response.status_code == 200:
            if endpoint == "/metrics":
                assert "requests_total" in response.text
            else:
                assert isinstance(response.json(), dict)
        count += 1
        sent[backend, endpoint] += 1

    run()
    assert count >= GET_CASES
    still_serving(world, backend)


def test_every_endpoint_of_both_backends_got_1000_cases(world):
    """Runs after the fuzzers above (file order): the per-endpoint totals, as the CI log shows them."""
    ran = {key: value for key, value in sent.items() if value}
    if not ran:
        pytest.skip("run together with the fuzz tests above (they were deselected)")
    print("\nfuzz cases per endpoint:", dict(sorted(ran.items())))
    for backend in BACKENDS:
        for endpoint in POST_ENDPOINTS + GET_ENDPOINTS:
            assert sent[backend, endpoint] >= 1000, (backend, endpoint, sent[backend, endpoint])


# -- the same over real HTTP ----------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKENDS)
def test_label_studio_shaped_cases_over_real_http(world, backend, tmp_path, constant_model):
    env = {
        "LABEL_STUDIO_URL": world.label_studio.url,
        "LABEL_STUDIO_API_KEY": world.label_studio.legacy_token,
        "IMAGE_ALLOWED_HOSTS": world.images.netloc,
        "IMAGE_CACHE_DIR": str(tmp_path / "cache"),
        "IMAGE_FETCH_RETRIES": "0",
        "IMAGE_FETCH_TIMEOUT": "2",
        "MODEL_DIR": str(tmp_path / "models"),
        "DEVICE": "cpu",
        "LOG_LEVEL": "INFO",
    }
    env |= {"SAM_ENGINE": BOX_ENGINE} if backend == "sam" else {"SEG_CHECKPOINT": str(constant_model)}
    module = "sam" if backend == "sam" else "segmentation"
    uris = strategies.image_uris(world.uris)
    bodies = {
        "/setup": strategies.setup_bodies,
        "/predict": strategies.predict_bodies(uris),
        "/webhook": strategies.webhook_bodies(uris),
    }
    with BackendProcess(module, env, tmp_path / "backend.log") as process, requests.Session() as http:
        for endpoint, strategy in bodies.items():
            count = 0

            @fuzz_settings(HTTP_CASES)
            @given(body=strategy)
            def run(body):
                nonlocal count
                response = http.post(
                    process.url + endpoint,  # noqa: B023  run() is called within this iteration
                    data=payloads.encode(body),
                    headers={"Content-Type": "application/json"},
                    timeout=30,
                )
                check_answer(response)
                count += 1

            run()
            assert count >= HTTP_CASES
        for endpoint in GET_ENDPOINTS:
            check_answer(http.get(process.url + endpoint, timeout=10))
        check_healthy(lambda path: http.get(process.url + path, timeout=10))
        assert process.process.poll() is None, process.log()[-3000:]
    assert "unexpected error answering" not in process.log()  # not a single 500


# -- bugs these fuzzers found, each pinned by the input that hit it -------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_named_self_is_not_a_server_error(world, backend):
    body = payloads.predict_body([payloads.task(1, world.ok_url)], None, self=1)
    response = world.clients[backend].post("/predict", json=body)
    check_answer(response)
    assert response.status_code == 200, describe(response)  # predict's own arguments are never shadowed


@pytest.mark.parametrize("backend", BACKENDS)
def test_webhook_action_with_a_lone_surrogate_is_not_a_server_error(world, backend):
    response = world.clients[backend].post(
        "/webhook", content=b'{"action": "\\ud800"}', headers={"Content-Type": "application/json"}
    )
    check_answer(response)
    assert response.status_code == 400 and "surrogate" in response.json()["error"], describe(response)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_config_with_a_lone_surrogate_is_a_400(world, backend):
    body = b'{"tasks": [], "project": "7", "label_config": "<View>\\ud800</View>"}'
    response = world.clients[backend].post("/predict", content=body, headers={"Content-Type": "application/json"})
    check_answer(response)
    assert response.status_code == 400 and "label_config" in response.json()["error"], describe(response)


@pytest.mark.parametrize("result", [True, 5])
def test_interactive_context_result_that_is_not_a_list_is_a_400(world, result):
    body = payloads.predict_body([payloads.task(1, world.ok_url)], {"result": result})
    response = world.clients["sam"].post("/predict", json=body)
    check_answer(response)
    assert response.status_code == 400 and "'result' list" in response.json()["error"], describe(response)


def test_interactive_region_with_a_list_to_name_is_a_400(world):
    region = payloads.rectangle(10, 10, 20, 20) | {"to_name": ["image"]}
    body = payloads.predict_body([payloads.task(1, world.ok_url)], {"result": [region]})
    response = world.clients["sam"].post("/predict", json=body)
    check_answer(response)
    assert response.status_code == 400 and "to_name" in response.json()["error"], describe(response)


@pytest.mark.parametrize("data", [{}, {"image": None}, ["not", "a", "dict"]])
def test_segmentation_task_without_an_image_uri_is_a_4xx_or_an_empty_prediction(world, data):
    client = world.clients["segmentation"]
    broken = {"id": 5, "data": data}
    single = client.post("/predict", json=payloads.predict_body([broken]))
    check_answer(single)
    assert single.status_code == 400
    batch = client.post("/predict", json=payloads.predict_body([payloads.task(1, world.ok_url), broken]))
    assert batch.status_code == 200, describe(batch)
    assert batch.json()["results"][1]["result"] == []
    assert "task 5" in batch.json()["results"][1]["error"]  # the empty prediction says why
    assert batch.json()["results"][0]["result"]  # the good task of the batch is still predicted


@pytest.mark.parametrize("data", [["x"], "image.png", 7])
def test_sam_task_data_that_is_not_an_object_is_a_400(world, data):
    body = payloads.predict_body([{"id": 1, "data": data}], {"result": [payloads.rectangle(10, 10, 20, 20)]})
    response = world.clients["sam"].post("/predict", json=body)
    check_answer(response)
    assert response.status_code == 400 and "data" in response.json()["error"], describe(response)


@pytest.mark.parametrize("endpoint", ["/setup", "/predict"])
def test_segmentation_project_id_with_a_nul_byte_is_a_400(world, endpoint):
    body = (payloads.setup_body() if endpoint == "/setup" else payloads.predict_body([])) | {"project": "1\x00"}
    response = world.clients["segmentation"].post(endpoint, json=body)
    check_answer(response)
    assert response.status_code == 400 and "project must be" in response.json()["error"], describe(response)
