"""The model contract both backends implement, shaped like label-studio-ml 2.x's `LabelStudioMLBase`.

An upstream model ports by changing its imports: it overrides `setup()`, `predict(tasks, context,
**kwargs)` (returning a `ModelResponse` or a list of per-task predictions) and optionally
`fit(event, data, **kwargs)`, and keeps state with `get`/`set`. What upstream lacks and we add,
after FastAPI's lifespan pattern: `startup(runtime)` runs once per process and RETURNS the
backend's `BackendService` (what every project shares: engines, caches, training queues, and the
`health()` / `versions()` the server reports); the server holds it and hands it to every model
instance (`self.service`), next to `self.runtime` (settings, images, the Label Studio client,
metrics, background work). Nothing per process lives on a class.

Lifecycle (see backends/server/app.py): one instance per Label Studio project, created at `/setup`
(or at the first `/predict` or webhook for that project) and recreated when the project's label
config changes; `setup()` runs once per instance, so it must be quick (Label Studio waits 3 s).
At most MAX_PROJECTS projects are kept: the least recently used one that the service's
`project_busy` does not hold is evicted, its instance and `get`/`set` state dropped and the
service's `forget_project` called, so
project ids any client can invent cannot grow memory, /health or /metrics without bound.

`self.runtime` is named so that it cannot be confused with Label Studio's `context` (the
interactive prompt `predict` receives).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pydantic

from backends.settings import Settings

if TYPE_CHECKING:
    from backends.images.fetcher import ImageFetcher
    from backends.label_studio.client import LabelStudioClient
    from backends.label_studio.label_config import LabelConfig
    from backends.metrics import Metrics
    from backends.server.work_queue import BoundedExecutor


class ModelResponse(pydantic.BaseModel):
    """What `predict` returns: one prediction per task, in task order.

    A prediction is Label Studio's `{"result": [region, ...], "score": float, "model_version": str}`;
    a missing `model_version` is filled in from the response's (then the model's) version.
    """

    model_config = pydantic.ConfigDict(extra="allow")

    model_version: str | None = None
    predictions: list[dict[str, Any]]


class ProjectStore:
    """Per-project key/value state kept in memory, shared by the instances of one server.

    Each project's values are one dict, which instances keep a reference to: after `forget`, an
    instance still serving a request writes to its own (orphaned) dict, never back into the store.
    """

    def __init__(self) -> None:
        self._values: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def values(self, project_id: str) -> dict[str, Any]:
        """The project's dict (created on first use); read and write it under `lock`."""
        with self.lock:
            return self._values.setdefault(project_id, {})

    def get(self, project_id: str, key: str) -> Any:
        with self.lock:
            return self._values.get(project_id, {}).get(key)

    def set(self, project_id: str, key: str, value: Any) -> None:
        with self.lock:
            self._values.setdefault(project_id, {})[key] = value

    def forget(self, project_id: str) -> None:
        with self.lock:
            self._values.pop(project_id, None)

    def __len__(self) -> int:
        return len(self._values)


@dataclass
class BackendRuntime:
    """The server's machinery, the same for every backend: configuration, image fetching, the
    Label Studio client, metrics and background work. Built by the server before `startup`."""

    settings: Settings
    images: ImageFetcher
    label_studio: LabelStudioClient
    metrics: Metrics
    #: Bounded background work: `submit` raises QueueFull when BACKGROUND_QUEUE_MAX jobs already wait.
    background: BoundedExecutor
    store: ProjectStore = field(default_factory=ProjectStore)
    #: Set when the server shuts down: long background work (training) should stop early.
    stopping: threading.Event = field(default_factory=threading.Event)


class BackendService:
    """What one backend shares across its projects for the life of the process (engines, caches,
    training queues), returned by `startup` and held by the server. The server asks it for /health
    and /versions and whether a project may be evicted; subclass it to answer more. This base
    serves a model with nothing to share: it reports `versions` as given."""

    def __init__(self, versions: list[str] | None = None):
        self._versions = list(versions or [])

    def health(self) -> dict:
        """Extra fields for GET /health (engine name, training state, ...)."""
        return {}

    def versions(self) -> list:
        """Model versions listed by GET /versions."""
        return list(self._versions)

    def training_history(self) -> dict[str, dict]:
        """Per project, the latest training run's points for the status page's plots
        (`{"loss": [[step, loss, elapsed_s], ...], "val_dice": [[step, dice, elapsed_s], ...]}`)."""
        return {}

    def project_busy(self, project_id: str) -> bool:
        """True while the project has work queued or running (a training run): the server does
        not evict a busy project (MAX_PROJECTS)."""
        return False

    def forget_project(self, project_id: str) -> None:
        """The server evicted the project (MAX_PROJECTS): drop what is kept for it (per-project
        state, /health entries, metric series). It is rebuilt if the project returns."""


class LabelStudioMLBase:
    """Base class of a backend model; override `setup`, `predict` and optionally `fit`.

    Class attributes are configuration only (constants); per-process state lives in the service
    `startup` returns, per-project state in `get`/`set`.
    """

    #: Default version; `model_version` falls back to the class name when this is None.
    MODEL_VERSION: ClassVar[str | None] = None
    #: Webhook actions passed to `fit`; the server answers others with 200 and does nothing.
    #: TASKS_CREATED is included (upstream's list lacks it) so models can prepare new tasks.
    TRAIN_EVENTS: ClassVar[tuple[str, ...]] = (
        "ANNOTATION_CREATED",
        "ANNOTATION_UPDATED",
        "ANNOTATION_DELETED",
        "START_TRAINING",
        "TASKS_CREATED",
    )
    #: True when `fit` only records the event or queues its own work (milliseconds): the server
    #: then calls it inside the webhook request and answers with its result, so it can say
    #: "already queued" or refuse with a 429. False: `fit` runs later on a background worker.
    FIT_IN_REQUEST: ClassVar[bool] = False

    def __init__(
        self,
        project_id: str | None = None,
        label_config: str | None = None,
        runtime: BackendRuntime | None = None,
        service: BackendService | None = None,
    ):
        self.project_id = None if project_id is None else str(project_id)
        self.label_config = label_config
        self.runtime = runtime
        self.service = service
        # Without a server (a model built by hand, e.g. in a test) state lives in the instance.
        self._store = runtime.store if runtime is not None else ProjectStore()
        self._values = self._store.values(self.project_id or "")
        self._parsed_label_config: LabelConfig | None = None

    # -- hooks for subclasses ----------------------------------------------------------------

    @classmethod
    def startup(cls, runtime: BackendRuntime) -> BackendService:
        """Once per process, before serving: load what all projects share (engines, weights) and
        return it as the service the server holds and hands to every instance."""
        return BackendService(versions=[cls.MODEL_VERSION or cls.__name__])

    def setup(self) -> None:
        """Once per project instance (keep it quick: Label Studio's /setup waits 3 s)."""

    def validate_label_config(self) -> None:
        """Raise a `BadRequest` when this model cannot serve `label_config`.

        Runs when an instance is created for a config; the default requires a segmentation
        output tag (BrushLabels or PolygonLabels) on an Image.
        """
        from backends.label_studio.label_config import require_segmentation_output

        require_segmentation_output(self.parsed_label_config)

    def predict(
        self, tasks: list[dict], context: dict | None = None, **kwargs: Any
    ) -> ModelResponse | list[dict] | None:
        """One prediction per task, in order. `context` is `{"result": [region, ...]}` when an
        annotator used a smart tool (interactive), else None. kwargs: `login`, `password`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement predict")

    def fit(self, event: str, data: dict, **kwargs: Any) -> dict | None:
        """Handle a webhook `event` (one of TRAIN_EVENTS); runs in the background."""
        return None

    # -- state -------------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        """A value stored for this project (None when absent); thread-safe."""
        with self._store.lock:
            return self._values.get(key)

    def set(self, key: str, value: Any) -> None:
        """Store a value for this project; thread-safe, in memory, lost on restart or eviction."""
        with self._store.lock:
            self._values[key] = value

    @property
    def model_version(self) -> str:
        version = self.get("model_version")
        if version:
            return str(version)
        return type(self).MODEL_VERSION or type(self).__name__

    @model_version.setter
    def model_version(self, version: str) -> None:
        self.set("model_version", version)

    # -- label config ------------------------------------------------------------------------

    @property
    def parsed_label_config(self) -> LabelConfig:
        """The parsed `label_config` (raises LabelConfigError, a BadRequest, when unusable)."""
        if self._parsed_label_config is None:
            from backends.errors import BadRequest
            from backends.label_studio.label_config import parse_label_config

            if not self.label_config:
                raise BadRequest("no label config: call /setup first or send label_config with /predict")
            if self.runtime is None:  # a model built by hand: the default limits
                self._parsed_label_config = parse_label_config(self.label_config)
            else:
                settings = self.runtime.settings
                self._parsed_label_config = parse_label_config(
                    self.label_config, max_kb=settings.label_config_max_kb, max_depth=settings.label_config_max_depth
                )
        return self._parsed_label_config

    def use_label_config(self, label_config: str) -> None:
        """Switch to another label config (upstream API); the parsed form is rebuilt on demand."""
        if label_config != self.label_config:
            self.label_config = label_config
            self._parsed_label_config = None
