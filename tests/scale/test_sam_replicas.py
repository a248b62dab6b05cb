"""Two SAM replicas behind a real nginx (round robin), sharing embeddings through a real
redis-server, connected to the real Label Studio: what an admin gets with several GPUs.

- Tasks created in Label Studio are prewarmed by one replica and land in Redis; clicks then
  alternate between replicas and none computes an embedding again; the masks are those a single
  replica without Redis gives.
- Redis stopped: both replicas keep answering (from their own memory) and /health warns; Redis
  back: they reconnect by themselves and publish again.
- A replica killed mid-run: clicks keep coming back (nginx passes a failed request on).

The classic engine (no weights) keeps each process small; its "embedding" is the image, stored
losslessly, so masks can be compared exactly.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import redis
from scipy import ndimage

from backends.masks.rle import decode_rle
from tests.support.images import cells, png
from tests.support.payloads import SMART_ONLY_CONFIG, rectangle_around

IMAGES = 3
SIZE = (120, 160)  # height, width


def wait_for(condition, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(every)


def embedding_keys(client: redis.Redis) -> list[bytes]:
    return list(client.scan_iter(match="sam:v1:*:emb:*", count=1000))


def counts(backend) -> dict:
    return backend.health()["embedding_sources"]


def total(backends, name: str) -> int:
    return sum(counts(b)[name] for b in backends)


def click(label_studio, ml_id: int, task_id: int, region: dict, attempts: int = 2) -> np.ndarray:
    """One smart rectangle through Label Studio -> the brush mask (H, W) bool; retried once on an
    error answer, as an annotator would click again."""
    for attempt in range(attempts):
        response = label_studio.http.post(
            f"{label_studio.url}/api/ml/{ml_id}/interactive-annotating",
            json={"task": task_id, "context": {"result": [region]}},
            timeout=60,
        )
        body = response.json() if response.status_code == 200 else {"errors": response.text[:300]}
        if "errors" not in body:
            [brush] = [r for r in body["data"]["result"] if r["type"] == "brushlabels"]
            return decode_rle(brush["value"]["rle"], brush["original_height"], brush["original_width"]) > 0
        if attempt == attempts - 1:
            raise AssertionError(f"click on task {task_id} failed: {body['errors']}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def stack(label_studio, start_backend, scale_redis, round_robin_proxy, tmp_path_factory):
    """Two replicas with REDIS_URL behind nginx on one project; a reference replica without Redis
    on a twin project (same images); the prompts (one rectangle per image)."""
    root = tmp_path_factory.mktemp("scale-images")
    paths, prompts = [], []
    for seed in range(IMAGES):
        image, truth = cells(seed, size=SIZE, disks=3)
        path = root / f"cells-{seed}.png"
        path.write_bytes(png(image))
        paths.append(path)
        components, _ = ndimage.label(truth)
        prompts.append(rectangle_around(components == 1))  # around one disk

    env = {"REDIS_URL": scale_redis.url, "REDIS_TIMEOUT_S": "0.3", "SAM_SHARED_LOCK_MS": "5000"}
    replicas = [start_backend("sam", env=env) for _ in range(2)]
    reference = start_backend("sam")
    proxy = round_robin_proxy([replica.port for replica in replicas])

    ls = label_studio.ls
    project = ls.projects.create(title="sam replicas", label_config=SMART_ONLY_CONFIG)
    ml = ls.ml.create(project=project.id, url=proxy.url, title="SAM (2 replicas)", is_interactive=True)
    twin = ls.projects.create(title="sam single replica", label_config=SMART_ONLY_CONFIG)
    reference_ml = ls.ml.create(project=twin.id, url=reference.url, title="SAM (one)", is_interactive=True)
    tasks = label_studio.upload_files(project.id, paths)  # TASKS_CREATED: a replica prewarms them
    reference_tasks = label_studio.upload_files(twin.id, paths)
    expected = [click(label_studio, reference_ml.id, t, p) for t, p in zip(reference_tasks, prompts, strict=True)]
    return SimpleNamespace(
        replicas=replicas,
        proxy=proxy,
        redis=scale_redis,
        client=redis.Redis.from_url(scale_redis.url, socket_timeout=2),
        ml_id=ml.id,
        project_id=project.id,
        tasks=tasks,
        prompts=prompts,
        expected=expected,
        paths=paths,
    )


def test_prewarm_lands_in_redis_and_clicks_on_either_replica_compute_nothing(label_studio, stack):
    wait_for(lambda: len(embedding_keys(stack.client)) == IMAGES, 30, "prewarmed embeddings in Redis")
    assert total(stack.replicas, "recomputes") == IMAGES  # each image embedded once, on some replica
    before = [counts(replica) for replica in stack.replicas]
    answered_before = len(stack.proxy.answered())

    masks = [
        click(label_studio, stack.ml_id, t, p)
        for _ in range(2)
        for t, p in zip(stack.tasks, stack.prompts, strict=True)
    ]

    after = [counts(replica) for replica in stack.replicas]
    assert [a["recomputes"] for a in after] == [b["recomputes"] for b in before]  # no embedding computed again
    served = [a["l1_hits"] + a["l2_hits"] - b["l1_hits"] - b["l2_hits"] for a, b in zip(after, before, strict=True)]
    assert sum(served) == 2 * IMAGES and min(served) >= 2, served  # both replicas answered clicks
    assert sum(a["l2_hits"] for a in after) >= 1  # a replica took another's embedding from Redis
    upstreams = stack.proxy.answered()[answered_before:]
    assert len(set(upstreams)) == 2, upstreams
    for mask, expected in zip(masks, stack.expected * 2, strict=True):
        assert np.array_equal(mask, expected)


def test_with_redis_stopped_replicas_answer_from_memory_warn_and_then_recover(label_studio, stack):
    stack.redis.stop()
    try:
        for task_id, prompt, expected in zip(stack.tasks, stack.prompts, stack.expected, strict=True):
            assert np.array_equal(click(label_studio, stack.ml_id, task_id, prompt), expected)
        for replica in stack.replicas:
            health = wait_for(
                lambda r=replica: (h := r.health())["shared_cache"]["state"] == "down" and h, 10, "Redis seen down"
            )
            assert health["status"] == "DEGRADED"
            assert "L1" in health["shared_cache"]["warning"] and health["shared_cache"]["last_error"]
    finally:
        stack.redis.start()  # the same port, empty
    for replica in stack.replicas:
        wait_for(lambda r=replica: r.health()["shared_cache"]["state"] == "up", 20, "reconnected to Redis")
    assert all(replica.health()["status"] == "UP" for replica in stack.replicas)
    recomputed = total(stack.replicas, "recomputes")
    (new_task,) = label_studio.upload_files(stack.project_id, stack.paths[:1])  # a new task is prewarmed...
    wait_for(lambda: len(embedding_keys(stack.client)) == 1, 30, "a new embedding in Redis")  # ...into Redis
    assert total(stack.replicas, "recomputes") == recomputed + 1


def test_a_click_sent_while_a_replica_dies_is_not_lost(label_studio, stack):
    survivor, victim = stack.replicas
    logged = len(stack.proxy.requests())
    results: list = []
    errors: list = []
    done = threading.Event()

    def annotate():
        try:
            for n in range(12):
                index = n % IMAGES
                mask = click(label_studio, stack.ml_id, stack.tasks[index], stack.prompts[index])
                results.append((index, mask))
                if n == 3:
                    os.killpg(victim.process.pid, signal.SIGKILL)  # mid-run, no goodbye
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)
        finally:
            done.set()

    thread = threading.Thread(target=annotate)
    thread.start()
    assert done.wait(120)
    thread.join(5)
    assert not errors, errors
    assert len(results) == 12
    for index, mask in results:
        assert np.array_equal(mask, stack.expected[index])
    assert not victim.process.alive()
    passed_on = [r for r in stack.proxy.requests()[logged:] if "," in r[3]]
    assert passed_on and all(status == "200" for _, _, status, _ in passed_on), passed_on  # nginx retried them
    assert survivor.health()["status"] == "UP"
