"""The scale-out suite: SAM replicas behind a real nginx, sharing embeddings through a real
redis-server, connected to the real Label Studio. Every test here starts real processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from devstack.nginx_proxy import NginxProxy, nginx_binary, start_round_robin_proxy
from devstack.redis_server import RedisServer, redis_server_binary, start_redis
from tests.support.ci import unavailable

SCALE_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test in this folder starts real processes: mark it even if its module forgets.
    for item in items:
        if SCALE_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


def _missing(what: str) -> None:
    """Skip, or fail in CI (CI=true), where a system part is not installed."""
    unavailable(f"{what} is not installed (apt-get install {what}; .ci/run does)")


@pytest.fixture(scope="module")
def scale_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this module's own: its tests stop and start it, which must not disturb the
    session's `redis_server` other suites use. Same settings (maxmemory, allkeys-lru)."""
    if redis_server_binary() is None:
        _missing("redis-server")
    root = tmp_path_factory.mktemp("scale-redis")
    server = start_redis(root / "data", root / "redis.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def round_robin_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Sequence[int]], NginxProxy]]:
    """Factory: `round_robin_proxy([port, port])` starts nginx in front of those loopback ports."""
    if nginx_binary() is None:
        _missing("nginx")
    started: list[NginxProxy] = []

    def start(ports: Sequence[int]) -> NginxProxy:
        proxy = start_round_robin_proxy(tmp_path_factory.mktemp("nginx"), ports)
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            proxy.stop()
