"""The Label Studio ML-backend protocol over HTTP, shared by both backends.

`create_app(ModelClass, settings)` serves what Label Studio 1.23 calls (timeouts it applies):
`GET /health` and `GET /` (1 s), `POST /setup` (3 s), `POST /predict` (100 s; batch, or interactive
with `params.context`), `POST /webhook` (1 s: answered at once, `fit` runs in the background),
`GET /versions`, plus `GET /metrics` (Prometheus text) and, for people, a status page: `GET /` from a
browser (Accept: text/html; anything else still gets /health's JSON), `GET /status.json` that it
polls, `GET /static/<file>` for its script and plot library (backends/server/status_page.py).

`BackendServer` holds what lives as long as the process (FastAPI's lifespan pattern): the runtime
(settings, image fetcher, the Label Studio client, metrics, background work), the service the
model's `startup` returned, one model instance per project, the Label Studio probe and telemetry.
It has one method per route; the routes in `create_app` only declare the HTTP shapes and call it.

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
import weakref
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from backends.errors import BadRequest, NotFound, TooManyRequests
from backends.label_studio.client import LabelStudioClient
from backends.metrics import Metrics
from backends.server.guard import JSONAnswer, RequestGuard, Telemetry, install_error_handlers, redact_answer
from backends.server.model_base import BackendRuntime, BackendService, LabelStudioMLBase
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
from backends.server.recent_errors import RecentErrors
from backends.server.status_page import StaticAssets, limits_in_force, render_status_page, status_report
from backends.server.work_queue import BoundedExecutor, QueueFull
from backends.settings import Settings

log = logging.getLogger(__name__)

BACKGROUND_WORKERS = 4
HEALTH_THREADS = 4  # /health gets its own threads: slow predictions must not starve it
RECENT_ERRORS = 50  # warnings and errors kept for the status page


# -- Label Studio reachability, for /health ---------------------------------------------------


class LabelStudioProbe:
    """Whether Label Studio answers, re-checked in a background thread at most every `ttl_s`.

    `/health` must answer within Label Studio's 1 s timeout, so it reads the last result and never
    waits for a probe (a down host can take the client's whole timeout to fail).
    """

    def __init__(self, label_studio: LabelStudioClient, ttl_s: float = 5.0):
        self._label_studio = label_studio
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._result: bool | None = None
        self._checked_url: str | None = None
        self._checked_at = float("-inf")
        self._running = False

    def reachable(self) -> bool | None:
        """True/False from the latest probe of the current URL; None when not configured or not probed yet."""
        url = self._label_studio.url
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
            result = bool(self._label_studio.health())
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
    good. Evicting drops the instance (its parsed config), its `get`/`set` values and calls the
    service's `forget_project`; a project the service says is busy (training) is kept meanwhile.
    """

    CREATION_LOCKS = 64  # striped: a lock per project id would itself grow without bound

    def __init__(
        self,
        model_class: type[LabelStudioMLBase],
        runtime: BackendRuntime,
        service: BackendService,
        max_projects: int = 32,
    ):
        self._model_class = model_class
        self._runtime = runtime
        self._service = service
        self.max_projects = max_projects
        self._evicted = runtime.metrics.counter(
            "projects_evicted", "Projects dropped from memory to stay within MAX_PROJECTS"
        )
        self._instances: collections.OrderedDict[str, LabelStudioMLBase] = collections.OrderedDict()
        self._creation_locks = [threading.Lock() for _ in range(self.CREATION_LOCKS)]
        self._lock = threading.Lock()

    def get(self, project_id: str, label_config: str | None) -> LabelStudioMLBase:
        with self._lock:
            instance = self._instances.get(project_id)
            if instance is not None and self._usable(instance, label_config):
                self._instances.move_to_end(project_id)
                return instance
        with self._creation_locks[hash(project_id) % self.CREATION_LOCKS]:
            with self._lock:
                instance = self._instances.get(project_id)
            if instance is not None and self._usable(instance, label_config):  # built concurrently meanwhile
                return instance
            if instance is not None and label_config is None:
                label_config = instance.label_config
            fresh = self._model_class(
                project_id=project_id, label_config=label_config, runtime=self._runtime, service=self._service
            )
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
            if project_id == keep or self._service.project_busy(project_id):
                continue
            del self._instances[project_id]
            evicted.append(project_id)
            excess -= 1
        return evicted

    def _forget(self, project_id: str) -> None:
        self._runtime.store.forget(project_id)
        try:
            self._service.forget_project(project_id)
        except Exception:  # eviction must not fail the request that caused it
            log.exception("%s.forget_project(%s) failed", type(self._service).__name__, project_id)
        self._evicted.inc()
        log.info(
            "project %s evicted: more than %d projects in memory (MAX_PROJECTS)", project_id or "-", self.max_projects
        )

    @staticmethod
    def _usable(instance: LabelStudioMLBase, label_config: str | None) -> bool:
        return label_config is None or label_config == instance.label_config


# -- the server -------------------------------------------------------------------------------


class BackendServer:
    """One backend process: what lives as long as it does, and what each route does with it.

    `images` defaults to `ImageFetcher(settings, label_studio)`, `label_studio` to
    `LabelStudioClient(settings)` (one client for downloads, training, the probe and /setup),
    `metrics` to a fresh registry. Runs `model_class.startup(runtime)` and holds the service it returns.
    """

    def __init__(
        self,
        model_class: type[LabelStudioMLBase],
        settings: Settings,
        *,
        images: Any = None,
        label_studio: LabelStudioClient | None = None,
        metrics: Metrics | None = None,
    ):
        settings.validate()  # refuse half-configured basic auth and the like before serving anything
        label_studio = label_studio if label_studio is not None else LabelStudioClient(settings)
        if images is None:
            from backends.images.fetcher import ImageFetcher

            images = ImageFetcher(settings, label_studio)
        metrics = metrics if metrics is not None else Metrics()
        self.model_class = model_class
        self.settings = settings
        self.runtime = BackendRuntime(
            settings=settings,
            images=images,
            label_studio=label_studio,
            metrics=metrics,
            background=BoundedExecutor(BACKGROUND_WORKERS, settings.background_queue_max, name="background"),
        )
        self.telemetry = Telemetry(metrics)
        self.service = model_class.startup(self.runtime)
        self.instances = ModelInstances(model_class, self.runtime, self.service, settings.max_projects)
        self.probe = LabelStudioProbe(label_studio)
        self.probe.reachable()  # first probe starts now, so the first /health already knows
        # The status page's recent errors: every warning logged in this process while the server
        # lives (the handler goes with the server, also when a test drops it without a shutdown).
        self.recent_errors = RecentErrors(capacity=RECENT_ERRORS)
        self.static_assets = StaticAssets()
        logging.getLogger().addHandler(self.recent_errors)
        weakref.finalize(self, logging.getLogger().removeHandler, self.recent_errors)

    def shutdown(self) -> None:
        """The process is stopping: long fits check `stopping` and stop early; queued work is dropped."""
        logging.getLogger().removeHandler(self.recent_errors)
        self.runtime.stopping.set()
        self.runtime.background.shutdown(wait=False, cancel_futures=True)

    # -- routes ------------------------------------------------------------------------------

    def health(self) -> dict:
        """GET /health: UP, or DEGRADED when Label Studio does not answer or the service says so."""
        report: dict[str, Any] = {"status": "UP", "model_class": self.model_class.__name__}
        reachable = self.probe.reachable()
        if reachable is not None:
            report["label_studio"] = "reachable" if reachable else "unreachable"
            if not reachable:
                report["status"] = "DEGRADED"
        try:
            extra = dict(self.service.health())
        except Exception:
            log.exception("%s.health() failed", type(self.service).__name__)
            extra = {"status": "DEGRADED", "health_error": "the model's health check failed; see the log"}
        if extra.pop("status", "UP") != "UP":
            report["status"] = "DEGRADED"
        report.update(extra)
        # where the Label Studio URL comes from, /setup values refused
        report["label_studio_setup"] = self.runtime.label_studio.setup_report()
        return redact_answer(report)  # like log lines: no token or URL password in an answer

    def setup(self, body: SetupRequest) -> dict:
        """POST /setup: take Label Studio's hostname and token (as far as trusted), ready the project."""
        self.runtime.label_studio.configure(hostname=body.hostname or None, access_token=body.access_token or None)
        model = self.instances.get(project_id_of(body.project), body.label_config)
        if body.extra_params:
            model.set("extra_params", body.extra_params)
        return {"model_version": model.model_version}

    def predict(self, body: PredictRequest) -> Response:
        """POST /predict: one prediction per task, interactive when `params.context` is set."""
        model = self.instances.get(project_id_of(body.project), body.label_config)
        prompts, params = predict_arguments(body.params)
        response = model.predict(body.tasks, context=prompts, **params)
        results = predictions_of(response, model.model_version)
        for result in results:  # a per-task error message is redacted like any error answer
            if isinstance(result, dict) and isinstance(result.get("error"), str):
                result["error"] = redact_answer(result["error"])
        # An empty list is a deliberate "nothing yet" (e.g. SAM prewarming); a partial one is a bug.
        if results and len(results) != len(body.tasks):
            log.warning(
                "%s returned %d predictions for %d tasks", self.model_class.__name__, len(results), len(body.tasks)
            )
        self.telemetry.predictions.labels("interactive" if prompts else "batch").inc(len(body.tasks))
        # Rendered here, not by FastAPI's encoder: models may return NumPy numbers and arrays.
        return JSONAnswer({"results": results})

    def webhook(self, body: WebhookRequest) -> dict:
        """POST /webhook: TRAIN_EVENTS go to the project's `fit`, in the request when the model says
        fit only queues (FIT_IN_REQUEST), else on a background worker (429 when that queue is full)."""
        model_class = self.model_class
        if body.action not in model_class.TRAIN_EVENTS:
            return {"status": "ignored", "reason": f"{model_class.__name__} does not handle {body.action}"}
        if body.project is None:
            raise BadRequest(f"webhook {body.action} has no project")
        project_id = project_id_of(body.project)
        label_config = body.project.get("label_config") if isinstance(body.project, dict) else None
        data = body.model_dump()
        data.pop("action")
        if model_class.FIT_IN_REQUEST:  # fit only queues its own bounded work: answer with what it did
            result = self._fit_counted(body.action, project_id, label_config, data)
            details = {key: value for key, value in (result or {}).items() if key != "status"}
            return {**details, "status": "ok"}
        try:
            self.runtime.background.submit(self._fit_in_background, body.action, project_id, label_config, data)
        except QueueFull as full:
            self.telemetry.webhooks.labels(body.action, "refused").inc()
            raise TooManyRequests(
                f"too much background work: {full.running} webhook or prewarm jobs running and {full.waiting} "
                f"waiting (BACKGROUND_QUEUE_MAX={self.settings.background_queue_max}); {body.action} for project "
                f"{project_id or '-'} was not queued, send it again later"
            ) from None
        return {"status": "ok"}

    def versions(self) -> dict:
        """GET /versions."""
        return {"versions": self.service.versions()}

    def status(self) -> dict:
        """GET /status.json: what the status page polls (backends/server/status_page.py), redacted."""
        return redact_answer(status_report(self))

    def status_page(self) -> Response:
        """GET / from a browser: the status page, its values escaped, secrets redacted."""
        report = status_report(self)
        try:
            versions = self.service.versions()
        except Exception:  # a broken version folder must not take the page down
            log.exception("%s.versions() failed", type(self.service).__name__)
            versions = []
        limits = limits_in_force(self.settings, self.model_class.__module__.partition(".")[0])
        page = render_status_page(redact_answer(report), redact_answer(versions), limits, self.model_class.__name__)
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    def static_file(self, name: str) -> Response:
        """GET /static/<name>: the status page's scripts and styles (an allow-list, nothing else)."""
        found = self.static_assets.get(name)
        if found is None:
            raise NotFound(f"no static file {name!r}")
        content, media_type = found
        return Response(content, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    def metrics_text(self) -> Response:
        """GET /metrics: Prometheus text."""
        payload, content_type = self.runtime.metrics.render()
        return Response(payload, media_type=content_type)

    # -- fit ---------------------------------------------------------------------------------

    def _fit_counted(self, action: str, project_id: str, label_config: str | None, data: dict) -> Any:
        """The project's instance runs `fit`; the outcome is counted in webhook_jobs_total."""
        webhooks = self.telemetry.webhooks
        try:
            model = self.instances.get(project_id, label_config)
            result = model.fit(action, data)
        except TooManyRequests:
            webhooks.labels(action, "refused").inc()
            raise
        except Exception:
            webhooks.labels(action, "error").inc()
            raise
        webhooks.labels(action, "ok").inc()
        return result

    def _fit_in_background(self, action: str, project_id: str, label_config: str | None, data: dict) -> None:
        try:
            self._fit_counted(action, project_id, label_config, data)
        except Exception as error:
            log.exception("%s for project %s failed in the background", action, project_id or "-")
            self.telemetry.error("/webhook", type(error).__name__)


# -- the app ----------------------------------------------------------------------------------


def create_app(
    model_class: type[LabelStudioMLBase],
    settings: Settings,
    *,
    images: Any = None,
    label_studio: LabelStudioClient | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """A FastAPI app serving `model_class` over Label Studio's ML-backend protocol.

    Builds a `BackendServer` (which runs `model_class.startup`; see it for the defaults) and routes
    to it. `app.state.server` gives tests and tools its runtime, service and instances.
    """
    server = BackendServer(model_class, settings, images=images, label_studio=label_studio, metrics=metrics)
    health_limiter = anyio.CapacityLimiter(HEALTH_THREADS)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        server.shutdown()

    app = FastAPI(
        title=f"{model_class.__name__} ML backend",
        description="Label Studio ML-backend protocol (label-studio 1.23)",
        default_response_class=JSONAnswer,
        lifespan=lifespan,
    )
    app.state.server = server
    install_error_handlers(app, server.telemetry)
    app.add_middleware(RequestGuard, settings=settings, telemetry=server.telemetry)

    @app.get(
        "/health",
        summary="Liveness and readiness, as Label Studio polls it",
        response_model=HealthResponse,
        responses=ERROR_RESPONSES,
    )
    async def health() -> dict:
        return await anyio.to_thread.run_sync(server.health, limiter=health_limiter)

    @app.get("/", include_in_schema=False)
    async def root(request: Request) -> Any:
        """The status page for a browser (Accept: text/html); /health's JSON for anything else."""
        if "text/html" in request.headers.get("accept", ""):  # the common pool: /health keeps its own threads
            return await anyio.to_thread.run_sync(server.status_page)
        return await anyio.to_thread.run_sync(server.health, limiter=health_limiter)

    @app.get("/status.json", include_in_schema=False)
    def status() -> dict:
        return server.status()

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> Response:
        return server.static_file(name)

    @app.post(
        "/setup",
        summary="Label Studio connects a project",
        response_model=SetupResponse,
        responses=ERROR_RESPONSES,
    )
    def setup(body: SetupRequest) -> dict:
        return server.setup(body)

    @app.post(
        "/predict",
        summary="Batch predictions, or an interactive one when params.context is set",
        response_model=PredictResponse,
        responses=ERROR_RESPONSES,
    )
    def predict(body: PredictRequest) -> Response:
        return server.predict(body)

    @app.post(
        "/webhook",
        summary="Label Studio events; fit runs in the background",
        response_model=WebhookResponse,
        responses=ERROR_RESPONSES,
    )
    def webhook(body: WebhookRequest) -> dict:
        return server.webhook(body)

    @app.get(
        "/versions",
        summary="Model versions this backend can serve",
        response_model=VersionsResponse,
        responses=ERROR_RESPONSES,
    )
    def versions() -> dict:
        return server.versions()

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
        return server.metrics_text()

    return app
