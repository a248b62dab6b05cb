"""The Label Studio ML-backend protocol over HTTP, shared by both backends.

`create_app(ModelClass, settings)` serves what Label Studio 1.23 calls (timeouts it applies):
`GET /health` and `GET /` (1 s), `POST /setup` (3 s), `POST /predict` (100 s; batch, or interactive
with `params.context`), `POST /webhook` (1 s: answered at once, `fit` runs in the background),
`GET /versions`, plus `GET /metrics` (Prometheus text).

Around every request (backends/http_guard.py): metrics and one log line (never the body, which
holds tokens and masks), optional basic auth, the body size cap, and error answers
`{"error": "<what was wrong>"}`; the server keeps serving after any of them. The wire format
(request and answer bodies) is in backends/protocol.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.responses import Response

from backends.errors import BadRequest
from backends.http_guard import JSONAnswer, RequestGuard, Telemetry, install_error_handlers
from backends.metrics import Metrics
from backends.model_base import BackendContext, LabelStudioMLBase
from backends.protocol import (
    ERROR_RESPONSES,
    HealthResponse,
    PredictRequest,
    PredictResponse,
    SetupRequest,
    SetupResponse,
    VersionsResponse,
    WebhookRequest,
    WebhookResponse,
    predict_arguments,
    predictions_of,
    project_id_of,
)
from backends.settings import Settings

log = logging.getLogger(__name__)

BACKGROUND_WORKERS = 4


# -- Label Studio reachability, for /health ---------------------------------------------------


class _LabelStudioProbe:
    """Whether Label Studio answers, re-checked in a background thread at most every `ttl_s`.

    `/health` must answer within Label Studio's 1 s timeout, so it reads the last result and never
    waits for a probe (a down host can take the fetcher's whole timeout to fail).
    """

    def __init__(self, images: Any, ttl_s: float = 5.0):
        self._images = images
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._result: bool | None = None
        self._checked_url: str | None = None
        self._checked_at = float("-inf")
        self._running = False

    def url(self) -> str:
        return getattr(self._images, "label_studio_url", "") or ""

    def reachable(self) -> bool | None:
        """True/False from the latest probe of the current URL; None when not configured or not probed yet."""
        url = self.url()
        if not url:
            return None
        with self._lock:
            stale = url != self._checked_url or time.monotonic() - self._checked_at > self._ttl_s
            if stale and not self._running:
                self._running = True
                threading.Thread(target=self._probe, args=(url,), name="ls-probe", daemon=True).start()
            return self._result if url == self._checked_url else None

    def _probe(self, url: str) -> None:
        try:
            result = bool(self._images.check_label_studio())
        except Exception:
            log.warning("Label Studio probe of %s failed", url, exc_info=True)
            result = False
        with self._lock:
            self._result, self._checked_url = result, url
            self._checked_at = time.monotonic()
            self._running = False


# -- per-project model instances --------------------------------------------------------------


class ModelInstances:
    """One model instance per project, created on first use and recreated when its label config
    changes. Creation (validate the config, then `setup()`) runs once per project at a time."""

    def __init__(self, model_class: type[LabelStudioMLBase], context: BackendContext):
        self._model_class = model_class
        self._context = context
        self._instances: dict[str, LabelStudioMLBase] = {}
        self._project_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, project_id: str, label_config: str | None) -> LabelStudioMLBase:
        with self._lock:
            instance = self._instances.get(project_id)
            if self._usable(instance, label_config):
                return instance
            project_lock = self._project_locks.setdefault(project_id, threading.Lock())
        with project_lock:
            instance = self._instances.get(project_id)
            if self._usable(instance, label_config):  # built by a concurrent request meanwhile
                return instance
            if instance is not None and label_config is None:
                label_config = instance.label_config
            fresh = self._model_class(project_id=project_id, label_config=label_config, context=self._context)
            if label_config:
                fresh.validate_label_config()
            fresh.setup()
            with self._lock:
                self._instances[project_id] = fresh
            log.info("model instance ready for project %s (%s)", project_id or "-", fresh.model_version)
            return fresh

    def __len__(self) -> int:
        return len(self._instances)

    @staticmethod
    def _usable(instance: LabelStudioMLBase | None, label_config: str | None) -> bool:
        return instance is not None and (label_config is None or label_config == instance.label_config)


# -- the app ----------------------------------------------------------------------------------


def create_app(
    model_class: type[LabelStudioMLBase],
    settings: Settings,
    *,
    images: Any = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """A FastAPI app serving `model_class` over Label Studio's ML-backend protocol.

    `images` defaults to `backends.images.ImageFetcher(settings)`; `metrics` to a fresh registry.
    Calls `model_class.startup(context)` before returning. `app.state.context` and
    `app.state.instances` give tests and tools access to the machinery.
    """
    if images is None:
        from backends.images import ImageFetcher

        images = ImageFetcher(settings)
    metrics = metrics if metrics is not None else Metrics()
    context = BackendContext(
        settings=settings,
        images=images,
        metrics=metrics,
        background=concurrent.futures.ThreadPoolExecutor(BACKGROUND_WORKERS, thread_name_prefix="background"),
    )
    telemetry = Telemetry(metrics)
    model_class.startup(context)
    instances = ModelInstances(model_class, context)
    probe = _LabelStudioProbe(images)
    probe.reachable()  # first probe starts now, so the first /health already knows
    # Health checks get their own threads: slow predictions must not starve them.
    health_limiter = anyio.CapacityLimiter(4)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        context.stopping.set()  # long fits check it and stop early
        context.background.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title=f"{model_class.__name__} ML backend",
        description="Label Studio ML-backend protocol (label-studio 1.23)",
        default_response_class=JSONAnswer,
        lifespan=lifespan,
    )
    app.state.context = context
    app.state.instances = instances
    app.state.model_class = model_class
    install_error_handlers(app, telemetry)
    app.add_middleware(RequestGuard, settings=settings, telemetry=telemetry)

    def health_report() -> dict:
        report: dict[str, Any] = {"status": "UP", "model_class": model_class.__name__}
        reachable = probe.reachable()
        if reachable is not None:
            report["label_studio"] = "reachable" if reachable else "unreachable"
            if not reachable:
                report["status"] = "DEGRADED"
        try:
            extra = dict(model_class.health())
        except Exception:
            log.exception("%s.health() failed", model_class.__name__)
            extra = {"status": "DEGRADED", "health_error": "the model's health check failed; see the log"}
        if extra.pop("status", "UP") != "UP":
            report["status"] = "DEGRADED"
        report.update(extra)
        return report

    @app.get(
        "/health",
        summary="Liveness and readiness, as Label Studio polls it",
        response_model=HealthResponse,
        responses=ERROR_RESPONSES,
    )
    @app.get("/", include_in_schema=False)
    async def health() -> dict:
        return await anyio.to_thread.run_sync(health_report, limiter=health_limiter)

    @app.post(
        "/setup",
        summary="Label Studio connects a project",
        response_model=SetupResponse,
        responses=ERROR_RESPONSES,
    )
    def setup(body: SetupRequest) -> dict:
        images.configure(hostname=body.hostname or None, access_token=body.access_token or None)
        model = instances.get(project_id_of(body.project), body.label_config)
        if body.extra_params:
            model.set("extra_params", body.extra_params)
        return {"model_version": model.model_version}

    @app.post(
        "/predict",
        summary="Batch predictions, or an interactive one when params.context is set",
        response_model=PredictResponse,
        responses=ERROR_RESPONSES,
    )
    def predict(body: PredictRequest) -> Response:
        model = instances.get(project_id_of(body.project), body.label_config)
        prompts, params = predict_arguments(body.params)
        response = model.predict(body.tasks, context=prompts, **params)
        results = predictions_of(response, model.model_version)
        # An empty list is a deliberate "nothing yet" (e.g. SAM prewarming); a partial one is a bug.
        if results and len(results) != len(body.tasks):
            log.warning(
                "%s returned %d predictions for %d tasks", model_class.__name__, len(results), len(body.tasks)
            )
        telemetry.predictions.labels("interactive" if prompts else "batch").inc(len(body.tasks))
        # Rendered here, not by FastAPI's encoder: models may return NumPy numbers and arrays.
        return JSONAnswer({"results": results})

    def run_fit(action: str, project_id: str, label_config: str | None, data: dict) -> None:
        try:
            model = instances.get(project_id, label_config)
            model.fit(action, data)
        except Exception as error:
            log.exception("%s for project %s failed in the background", action, project_id or "-")
            telemetry.error("/webhook", type(error).__name__)
            telemetry.webhooks.labels(action, "error").inc()
        else:
            telemetry.webhooks.labels(action, "ok").inc()

    @app.post(
        "/webhook",
        summary="Label Studio events; fit runs in the background",
        response_model=WebhookResponse,
        responses=ERROR_RESPONSES,
    )
    def webhook(body: WebhookRequest) -> dict:
        if body.action not in model_class.TRAIN_EVENTS:
            return {"status": "ignored", "reason": f"{model_class.__name__} does not handle {body.action}"}
        if body.project is None:
            raise BadRequest(f"webhook {body.action} has no project")
        project_id = project_id_of(body.project)
        label_config = body.project.get("label_config") if isinstance(body.project, dict) else None
        data = body.model_dump()
        data.pop("action")
        context.background.submit(run_fit, body.action, project_id, label_config, data)
        return {"status": "ok"}

    @app.get(
        "/versions",
        summary="Model versions this backend can serve",
        response_model=VersionsResponse,
        responses=ERROR_RESPONSES,
    )
    def versions() -> dict:
        return {"versions": model_class.versions()}

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
            **ERROR_RESPONSES,
        },
    )
    def metrics_text() -> Response:
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    return app
