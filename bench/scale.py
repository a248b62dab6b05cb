"""Click latency with the shared embedding cache: an L2 (Redis) hit against an L1 (in-process) hit
and a recompute, in one run.

    python -m bench.scale [--model-type vit_b] [--device auto] [--clicks 20] [--recomputes 4]

Two SAM backend apps (the real server under uvicorn, in this process) share one real redis-server
(Debian's, started here with maxmemory and allkeys-lru): replica A embeds an image and publishes
it; replica B's clicks on that image are L2 hits (its L1 entry is dropped before each click, so
every click reads and decodes the fp16 embedding from Redis); A's clicks are L1 hits; a click on a
new image is a recompute (fetch, decode, embed, publish). RANDOM weights (the same compute as
Meta's checkpoints) on synthetic 1024x768 images; as in bench.sam_latency the decoder runs for
every click and its noise mask is then replaced by the ellipse inscribed in the box.

Figures (one JSON line each, via bench.common.emit), after one untimed click; L1 and L2 clicks are
interleaved so that both see the same load:
- click_ms_l1_hit p50 (p90 beside it): clicks on a replica that holds the embedding.
- click_ms_l2_hit p50, against click_ms_l1_hit p50: clicks on a replica that reads it from Redis;
  beside it the embedding lookup alone (no HTTP, no decoder) from Redis and from L1.
- click_ms_recompute p50, against click_ms_l1_hit p50: first clicks on new images.
- embedding_bytes_in_redis: one stored value, against the float32 embedding in memory.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import redis

from backends.devices import resolve_device
from backends.settings import Settings
from bench.common import emit, machine
from bench.sam_latency import (
    ANSWER_MASK,
    HEIGHT,
    WIDTH,
    BackendServer,
    ImageServer,
    ellipse_in_box,
    percentile,
    smart_rectangle,
    synchronise,
    timed_ms,
)
from devstack.redis_server import start_redis
from sam.engines.prediction import MaskPrediction
from sam.engines.segment_anything_engine import save_random_checkpoint


class SmoothAnswers:
    """Runs the real decoder (and keeps its logits for refinement), answers with the box's ellipse."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.name, self.device = engine.name, getattr(engine, "device", "cpu")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def predict_with_logits(self, embedding, box=None, points=None, point_labels=None, mask_input=None):
        decoded = self._engine.predict_with_logits(embedding, box, points, point_labels, mask_input=mask_input)
        synchronise(str(self.device))
        return MaskPrediction(ellipse_in_box(box, *decoded.mask.shape), decoded.score, decoded.logits)


def store_of(backend: BackendServer) -> Any:
    return backend.app.state.server.service.store


def measure(args: argparse.Namespace, settings: Settings) -> dict:
    images = ImageServer()
    first, second = BackendServer(settings), BackendServer(settings)
    for backend in (first, second):
        store_of(backend).engine = SmoothAnswers(store_of(backend).engine)
    try:
        first.predict(images.url(0), 1, smart_rectangle())  # A embeds image 0 and publishes it
        second_store = store_of(second)
        identity = second_store._images.identity(images.url(0), 1)

        def l1_click() -> None:
            first.predict(images.url(0), 1, smart_rectangle())

        def l2_click() -> None:
            second_store.cache.discard(identity)  # B holds nothing: the click reads image 0 from Redis
            second.predict(images.url(0), 1, smart_rectangle())

        def l2_lookup() -> None:  # the same without HTTP and decoder: Redis read + decode only
            second_store.cache.discard(identity)
            second_store.get(images.url(0), 1)

        before = dict(second_store.sources.snapshot())
        l1, l2, l1_lookup, l2_lookup_ms = [], [], [], []
        for _ in range(args.clicks):  # interleaved: both kinds see the same load on a shared machine
            l1 += timed_ms(l1_click, 1, "cpu", warmup=0)
            l2 += timed_ms(l2_click, 1, "cpu", warmup=0)
            l1_lookup += timed_ms(lambda: store_of(first).get(images.url(0), 1), 1, "cpu", warmup=0)
            l2_lookup_ms += timed_ms(l2_lookup, 1, "cpu", warmup=0)
        after = second_store.sources.snapshot()
        new_images = iter(range(1, args.recomputes + 2))
        recompute = timed_ms(
            lambda: first.predict(images.url(n := next(new_images)), 100 + n, smart_rectangle()), args.recomputes, "cpu"
        )
        shared = store_of(first).shared
        stored = redis.Redis.from_url(settings.redis_url).strlen(shared.embedding_key(identity))
        in_memory = store_of(first).cache.get(identity)
        return {
            "l1": l1,
            "l2": l2,
            "l1_lookup": l1_lookup,
            "l2_lookup": l2_lookup_ms,
            "recompute": recompute,
            "l2_recomputes": after["recomputes"] - before["recomputes"],
            "l2_hits": after["l2_hits"] - before["l2_hits"],
            "stored_bytes": stored,
            "fp32_bytes": int(in_memory.embedding.features.nelement() * 4),
            "model": store_of(first).engine.name,
        }
    finally:
        first.close()
        second.close()
        images.close()


def run(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    checkpoint = save_random_checkpoint(workdir / f"random_{args.model_type}.pth", args.model_type)
    server = start_redis(workdir / "redis", workdir / "redis.log", maxmemory_mb=512)
    try:
        settings = Settings(
            sam_engine="sam",
            sam_checkpoint=str(checkpoint),
            sam_model_type=args.model_type,
            device=device,
            image_cache_dir=workdir / "image-cache",
            embedding_cache_mb=512,
            image_allowed_hosts=("127.0.0.1",),
            redis_url=server.url,
        )
        served = measure(args, settings)
    finally:
        server.stop()

    l1_p50 = statistics.median(served["l1"])
    common = {
        "machine": machine(),
        "device": device,
        "model": f"{served['model']}, random weights",
        "data": f"synthetic {WIDTH}x{HEIGHT} RGB, box prompt, two replicas in one process, redis-server on loopback",
        "answer_mask": ANSWER_MASK,
    }
    return [
        emit(
            "click_ms_l1_hit",
            l1_p50,
            "ms",
            None,
            p90_ms=round(percentile(served["l1"], 90), 1),
            clicks=len(served["l1"]),
            **common,
        ),
        emit(
            "click_ms_l2_hit",
            statistics.median(served["l2"]),
            "ms",
            l1_p50,
            baseline="click_ms_l1_hit p50",
            p90_ms=round(percentile(served["l2"], 90), 1),
            clicks=len(served["l2"]),
            l2_hits=served["l2_hits"],
            embeddings_recomputed=served["l2_recomputes"],
            l2_lookup_ms_p50=round(statistics.median(served["l2_lookup"]), 2),
            l1_lookup_ms_p50=round(statistics.median(served["l1_lookup"]), 3),
            **common,
        ),
        emit(
            "click_ms_recompute",
            statistics.median(served["recompute"]),
            "ms",
            l1_p50,
            baseline="click_ms_l1_hit p50",
            clicks=len(served["recompute"]),
            **common,
        ),
        emit(
            "embedding_bytes_in_redis",
            served["stored_bytes"],
            "bytes",
            served["fp32_bytes"],
            baseline="the float32 embedding in memory (L1)",
            **common,
        ),
    ]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "vit_tiny"])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--clicks", type=int, default=20, help="clicks timed for each of L1 and L2 hits")
    parser.add_argument("--recomputes", type=int, default=3, help="clicks on new images timed")
    return parser


def main(argv: list[str] | None = None) -> None:
    run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
