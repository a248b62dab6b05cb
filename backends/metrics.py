"""Prometheus metrics for one server: a private registry and get-or-create helpers.

Each `create_app` builds its own `Metrics`, so several apps (tests) live in one process without
"Duplicated timeseries" errors. Models and caches register what they report through the helpers,
which return the existing metric when the same name is asked for again with the same labels.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Request latencies span health checks (~1 ms) to batch predictions (tens of seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """A Prometheus registry with idempotent metric constructors.

    `counter("requests", ...)` is exposed as `requests_total`; names are used as given otherwise.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, tuple[type, tuple[str, ...], object]] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        # prometheus_client appends `_total` itself; accept either spelling.
        base = name[: -len("_total")] if name.endswith("_total") else name
        return self._get_or_create(Counter, base, documentation, labels)

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
        return self._get_or_create(Gauge, name, documentation, labels)

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return self._get_or_create(Histogram, name, documentation, labels, buckets=tuple(buckets))

    def render(self) -> tuple[bytes, str]:
        """The exposition text of every metric in the registry, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _get_or_create(self, kind: type, name: str, documentation: str, labels: Sequence[str], **extra):
        labels = tuple(labels)
        with self._lock:
            known = self._metrics.get(name)
            if known is not None:
                known_kind, known_labels, metric = known
                if known_kind is not kind or known_labels != labels:
                    raise ValueError(
                        f"metric {name!r} already exists as a {known_kind.__name__} with labels "
                        f"{list(known_labels)}; asked for a {kind.__name__} with labels {list(labels)}"
                    )
                return metric
            metric = kind(name, documentation, labels, registry=self.registry, **extra)
            self._metrics[name] = (kind, labels, metric)
            return metric
