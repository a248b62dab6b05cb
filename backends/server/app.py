"""The Label Studio ML-backend protocol over HTTP, shared by both backends.

`create_app(ModelClass, settings)` serves what Label Studio 1.23 calls (timeouts it applies):
`GET /health` and `GET /` (1 s), `POST /setup` (3 s), `POST /predict` (100 s; batch, or interactive
with `params.context`), `POST /webhook` (1 s: answered at once, `fit` runs in the background),
`GET /versions`, plus `GET /metrics` (Prometheus text).

Around every request (backends/server/guard.py): metrics and one log line (never the body, which
holds tokens and masks), optional basic auth, the body size cap, and error answers
`{"error": "<what was wrong>"}`; the server keeps serving after any of them. The wire format
(request and answer bodies) is in backends/server/protocol.py.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.responses import Response

from backends.errors import BadRequest, TooManyRequests
from backends.server.guard import JSONAnswer, RequestGuard, Telemetry, install_error_handlers, redact_answer
from backends.metrics import Metrics
from backends.server.model_base import BackendContext, LabelStudioMLBase
from backends.server.protocol import (
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
from backends.server.work_queue import BoundedExecutor, QueueFull

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
    changes. Creation (validate the config, then `setup()`) runs once per project at a time.

    At most `max_projects` (MAX_PROJECTS) are kept, least recently used first out: project ids
    come from any client, so each new one must not add memory, /health and /metrics entries for
    good. Evicting drops the instance (its parsed config), its `get`/`set` values and calls
    `model_class.forget_project`; a project the model says is busy (training) is kept meanwhile.
    """

    CREATION_LOCKS = 64  # striped: a lock per project id would itself grow without bound

    def __init__(self, model_class: type[LabelStudioMLBase], context: BackendContext, max_projects: int = 32):
        self._model_class = model_class
        self._context = context
        self.max_projects = max_projects
        self._evicted = context.metrics.counter(
            "projects_evicted", "Projects dropped from memory to stay within MAX_PROJECTS"
        )
        self._instances: collections.OrderedDict[str, LabelStudioMLBase] = collections.OrderedDict()
        self._creation_locks = [threading.Lock() for _ in range(self.CREATION_LOCKS)]
        self._lock = threading.Lock()

    def get(self, project_id: str, label_config: str | None) -> LabelStudioMLBase:
        with self._lock:
            instance = self._instances.get(project_id)
            if self._usable(instance, label_config):
                self._instances.move_to_end(project_id)
                return instance
        with self._creation_locks[hash(project_id) % self.CREATION_LOCKS]:
            with self._lock:
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
                self._instances.move_to_end(project_id)
                evicted = self._evict_over_cap(keep=project_id)
            for old_project in evicted:
                self._forget(old_project)
            log.info("model instance ready for project %s (%s)", project_id or "-", fresh.model_version)
            return fresh

    def __len__(self) -> int:
        return len(self._instances)

    def project_ids(self) -> list[str]:
        """Projects held, least recently used first."""
        with self._lock:
            return list(self._instances)

    def _evict_over_cap(self, keep: str) -> list[str]:
        """Under the lock: remove least recently used, idle projects until at most `max_projects`."""
        evicted: list[str] = []
        excess = len(self._instances) - self.max_projects
        for project_id in list(self._instances):
            if excess <= 0:
                break
            if project_id == keep or self._model_class.project_busy(project_id):
                continue
            del self._instances[project_id]
            evicted.append(project_id)
            excess -= 1
        return evicted

    def _forget(self, project_id: str) -> None:
        self._context.store.forget(project_id)
        try:
            self._model_class.forget_project(project_id)
        except Exception:  # eviction must not fail the request that caused it
            log.exception("%s.forget_project(%s) failed", self._model_class.__name__, project_id)
        self._evicted.inc()
        log.info("project %s evicted: more than %d projects in memory (MAX_PROJECTS)", project_id or "-",
                 self.max_projects)

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

    `images` defaults to `backends.images.fetcher.ImageFetcher(settings)`; `metrics` to a fresh registry.
    Calls `model_class.startup(context)` before returning. `app.state.context` and
    `app.state.instances` give tests and tools access to the machinery.
    """
    settings.validate()  # refuse half-configured basic auth and the like before serving anything
    if images is None:
        from backends.images.fetcher import ImageFetcher

        images = ImageFetcher(settings)
    metrics = metrics if metrics is not None else Metrics()
    context = BackendContext(
        settings=settings,
        images=images,
        metrics=metrics,
        background=BoundedExecutor(BACKGROUND_WORKERS, settings.background_queue_max, name="background"),
    )
    telemetry = Telemetry(metrics)
    model_class.startup(context)
    instances = ModelInstances(model_class, context, settings.max_projects)
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
        setup_report = getattr(images, "setup_report", None)
        if setup_report is not None:  # where the Label Studio URL comes from, /setup values refused
            report["label_studio_setup"] = setup_report()
        return redact_answer(report)  # like log lines: no token or URL password in an answer

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
        for result in results:  # a per-task error message is redacted like any error answer
            if isinstance(result, dict) and isinstance(result.get("error"), str):
                result["error"] = redact_answer(result["error"])
        # An empty list is a deliberate "nothing yet" (e.g. SAM prewarming); a partial one is a bug.
        if results and len(results) != len(body.tasks):
            log.warning(
                "%s returned %d predictions for %d tasks", model_class.__name__, len(results), len(body.tasks)
            )
        telemetry.predictions.labels("interactive" if prompts else "batch").inc(len(body.tasks))
        # Rendered here, not by FastAPI's encoder: models may return NumPy numbers and arrays.
        return JSONAnswer({"results": results})

    def fit_counted(action: str, project_id: str, label_config: str | None, data: dict) -> Any:
        """The project's instance runs `fit`; the outcome is counted in webhook_jobs_total."""
        try:
            model = instances.get(project_id, label_config)
            result = model.fit(action, data)
        except TooManyRequests:
            telemetry.webhooks.labels(action, "refused").inc()
            raise
        except Exception:
            telemetry.webhooks.labels(action, "error").inc()
            raise
        telemetry.webhooks.labels(action, "ok").inc()
        return result

    def fit_in_background(action: str, project_id: str, label_config: str | None, data: dict) -> None:
        try:
            fit_counted(action, project_id, label_config, data)
        except Exception as error:
            log.exception("%s for project %s failed in the background", action, project_id or "-")
            telemetry.error("/webhook", type(error).__name__)

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
        if model_class.FIT_IN_REQUEST:  # fit only queues its own bounded work: answer with what it did
            result = fit_counted(body.action, project_id, label_config, data)
            details = {key: value for key, value in (result or {}).items() if key != "status"}
            return {**details, "status": "ok"}
        try:
            context.background.submit(fit_in_background, body.action, project_id, label_config, data)
        except QueueFull as full:
            telemetry.webhooks.labels(body.action, "refused").inc()
            raise TooManyRequests(
                f"too much background work: {full.running} webhook or prewarm jobs running and {full.waiting} "
                f"waiting (BACKGROUND_QUEUE_MAX={settings.background_queue_max}); {body.action} for project "
                f"{project_id or '-'} was not queued, send it again later"
            ) from None
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
