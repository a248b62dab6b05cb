"""Predictions that stay current: when a project's served model version changes, its unlabeled
tasks get that version's prediction in Label Studio, in the background.

Why: Label Studio asks /predict only for a task with no prediction (label-studio-facts.md), so a
task opened before a new version keeps the older version's prediction (or none) until someone
deletes predictions or presses "Retrieve predictions".

The trigger is "the served version changed": `SegmentationBackend.served_model()` tells the
refresher which version it serves (`served`), and the refresher's thread asks the projects it has
seen again every WATCH_INTERVAL_S. So a version promoted by a training run in this process, by a
worker elsewhere or by the offline CLI is refreshed once this process serves it. The first version
served after a start counts as a change too (tasks that already hold it are skipped cheaply).

A refresh of project P to version V runs on the refresher's one thread (one project at a time; a
newer version of P supersedes P's running refresh at its next task):
1. page through `GET /api/tasks?project=P` (PAGE_SIZE tasks a page, at most MAX_PAGES pages, only
   the fields needed);
2. keep the tasks with no annotation, submitted or cancelled;
3. read a kept task's predictions (`GET /api/predictions/?task=ID`, when it has any): a task that
   already has one of V is done;
4. predict BATCH tasks at a time through the project's own `predict` (the answer /predict gives);
5. write each (`POST /api/predictions/`: task, result, score, model_version), then delete that
   task's older predictions of this backend (`is_own_version`): never another model's prediction,
   never an annotation.
At most SEG_REFRESH_RATE tasks a second are handled (3-5), at most SEG_REFRESH_MAX_TASKS predicted
per refresh. Every Label Studio answer is checked: a refused call or a malformed answer is an error
counted in /health (the first few quoted) and the refresh goes on, or ends `failed` when it cannot
page any further.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from backends.errors import BackendError
from backends.settings import Settings
from segmentation.versions import list_versions

if TYPE_CHECKING:
    from backends.server.model_base import BackendRuntime, ModelResponse
    from segmentation.versions import LoadedModel

log = logging.getLogger(__name__)

PAGE_SIZE = 100  # tasks a listing page (Label Studio's own default)
MAX_PAGES = 1000  # listing pages a refresh reads: 100 000 tasks
BATCH = 4  # tasks predicted together (one image decoded at a time in any case)
MAX_PREDICTIONS_READ = 200  # predictions of one task looked at; more is not an answer we trust
WATCH_INTERVAL_S = 5.0  # how often the projects seen are asked which version they serve
MAX_HISTORY = 100  # versions remembered per project as served by this process
MAX_REPORTED_ERRORS = 5
MAX_ERROR_CHARS = 200
TASK_FIELDS = "id,data,total_annotations,cancelled_annotations,total_predictions"
UNTRAINED = "untrained"  # the version name of "no model" answers (earlier releases stored them)
# The names this trainer gives its versions (segmentation.versions.new_version_name).
OWN_VERSION_NAME = re.compile(r"seg-\d{8}-\d{6}-[0-9a-f]{4}")


class ServedProject(Protocol):
    """What a refresh needs from a project's model instance (a `SegmentationBackend`)."""

    project_id: str | None
    runtime: BackendRuntime

    @property
    def project_dir(self) -> Path: ...

    def served_model(self) -> LoadedModel | None: ...

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> ModelResponse: ...


@dataclass(frozen=True)
class RefreshStatus:
    """A project's latest refresh as /health shows it; times are Unix seconds."""

    version: str
    state: str = "queued"  # queued | running | done | superseded | stopped | failed
    listed: int = 0  # tasks seen in the listing
    unlabeled: int = 0  # of those, tasks with no annotation
    refreshed: int = 0  # given the version's prediction
    current: int = 0  # already had it
    errors: int = 0
    error_samples: tuple[str, ...] = ()
    queued: float = 0.0
    started: float | None = None
    finished: float | None = None
    note: str | None = None

    def report(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields["error_samples"] = list(self.error_samples)
        return {name: value for name, value in fields.items() if value is not None}


class RefreshError(Exception):
    """A Label Studio call of a refresh failed or answered something unusable."""


def is_own_version(model_version: Any, own_versions: set[str]) -> bool:
    """Whether a prediction's `model_version` is this backend's: a version of the project or of
    MODEL_DIR, one this process served, "untrained", or a name this trainer gives (a version
    deleted since). Another backend's or an imported prediction is never ours."""
    if not isinstance(model_version, str):
        return False
    return model_version in own_versions or OWN_VERSION_NAME.fullmatch(model_version) is not None


def is_unlabeled(task: dict) -> bool:
    """A listed task with no annotation at all, submitted or cancelled (counts must be 0)."""
    annotations, cancelled = task.get("total_annotations"), task.get("cancelled_annotations", 0)
    return type(annotations) is int and annotations == 0 and type(cancelled) is int and cancelled == 0


class RateLimit:
    """At most `rate` units a second on average, in bursts of at most one batch: `wait(n)` blocks
    until n more units are allowed; False when `stopping` was set meanwhile."""

    def __init__(self, rate: float, stopping: threading.Event, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self._stopping = stopping
        self._clock = clock
        self._next = clock()

    def wait(self, units: int) -> bool:
        delay = self._next - self._clock()
        if delay > 0 and self._stopping.wait(delay):
            return False
        self._next = max(self._next, self._clock()) + units / self.rate
        return not self._stopping.is_set()


class PredictionRefresher:
    """One background thread that keeps the unlabeled tasks' predictions at the served version
    (see the module doc). Owned by the `SegmentationService`; `served` is its trigger, `report`
    its /health section, `forget` drops an evicted project."""

    def __init__(
        self, settings: Settings, fallback_versions: Iterable[str] = (), watch_interval_s: float = WATCH_INTERVAL_S
    ):
        self.enabled = settings.seg_refresh
        self.fallback_versions = set(fallback_versions)  # served to projects without a model of their own
        self.rate = settings.seg_refresh_rate
        self.max_tasks = settings.seg_refresh_max_tasks
        self.watch_interval_s = watch_interval_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._served: dict[str, str] = {}  # project -> the version it serves, as last told
        self._history: dict[str, list[str]] = {}  # project -> the versions it served, latest MAX_HISTORY
        self._projects: dict[str, ServedProject] = {}  # project -> its latest instance
        self._pending: dict[str, str] = {}  # project -> version to refresh to (insertion order)
        self._status: dict[str, RefreshStatus] = {}
        self._thread: threading.Thread | None = None
        self._stopping: threading.Event | None = None

    # -- trigger ---------------------------------------------------------------------------------

    def served(self, project: ServedProject, version: str | None) -> None:
        """`project` serves `version` now, None when no model yet (called on every
        `served_model()`: cheap). The project is watched from now on; a version other than the one
        last told queues a refresh of the project, superseding its older one."""
        key = project.project_id or ""
        if not self.enabled or not key.isdigit():  # off, or no Label Studio project behind it
            return
        with self._lock:
            self._projects[key] = project
            self._start(project.runtime.stopping)
            if version is None or self._served.get(key) == version:
                return
            self._served[key] = version
            history = self._history.setdefault(key, [])
            if version not in history:
                history[:] = [*history, version][-MAX_HISTORY:]
            self._pending.pop(key, None)
            self._pending[key] = version
            self._status[key] = RefreshStatus(version=version, queued=time.time())
        self._wake.set()

    def forget(self, project_id: str) -> None:
        """The project was evicted (MAX_PROJECTS): stop its refresh and drop its state."""
        with self._lock:
            for table in (self._served, self._history, self._projects, self._pending, self._status):
                table.pop(project_id, None)

    def report(self) -> dict[str, Any]:
        """The /health section: settings and each project's latest refresh."""
        with self._lock:
            statuses = dict(self._status)
        return {
            "enabled": self.enabled,
            "rate_per_s": self.rate,
            "max_tasks": self.max_tasks,
            "projects": {project: status.report() for project, status in statuses.items()},
        }

    def status(self, project_id: str) -> RefreshStatus | None:
        with self._lock:
            return self._status.get(project_id)

    # -- the thread ------------------------------------------------------------------------------

    def _start(self, stopping: threading.Event) -> None:
        """Under the lock: start the thread once."""
        if self._thread is None:
            self._stopping = stopping
            self._thread = threading.Thread(target=self._run, name="prediction-refresh", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        stopping = self._stopping
        assert stopping is not None
        watched = time.monotonic()
        while not stopping.is_set():
            self._wake.wait(min(self.watch_interval_s, 0.5))
            self._wake.clear()
            job = self._next_job()
            if job is not None:
                self._refresh(*job, stopping)
            elif time.monotonic() - watched >= self.watch_interval_s:
                watched = time.monotonic()
                self._watch()
        with self._lock:
            for key, status in self._status.items():
                if status.state in ("queued", "running"):
                    self._status[key] = dataclasses.replace(status, state="stopped", note="the server stopped")

    def _next_job(self) -> tuple[str, str, ServedProject] | None:
        with self._lock:
            for key, version in self._pending.items():
                del self._pending[key]
                return key, version, self._projects[key]
        return None

    def _watch(self) -> None:
        """Ask every project seen which version it serves: `served_model()` calls `served`."""
        with self._lock:
            projects = list(self._projects.values())
        for project in projects:
            try:
                project.served_model()
            except Exception:  # one project's broken model must not stop the others' refreshes
                log.exception("project %s: cannot tell which version it serves", project.project_id or "-")

    def _update(self, key: str, version: str, **fields: Any) -> None:
        with self._lock:
            status = self._status.get(key)
            if status is not None and status.version == version:
                self._status[key] = dataclasses.replace(status, **fields)

    def _error(self, key: str, version: str, message: str) -> None:
        log.warning("project %s: refreshing predictions to %s: %s", key or "-", version, message)
        with self._lock:
            status = self._status.get(key)
            if status is None or status.version != version:
                return
            samples = status.error_samples
            if len(samples) < MAX_REPORTED_ERRORS:
                samples += (message[:MAX_ERROR_CHARS],)
            self._status[key] = dataclasses.replace(status, errors=status.errors + 1, error_samples=samples)

    def _superseded(self, key: str, version: str) -> bool:
        with self._lock:
            return self._served.get(key) != version or key not in self._projects

    # -- one refresh -----------------------------------------------------------------------------

    def _refresh(self, key: str, version: str, project: ServedProject, stopping: threading.Event) -> None:
        self._update(key, version, state="running", started=time.time())
        try:
            outcome, note = self._refresh_tasks(key, version, project, stopping)
        except RefreshError as error:
            self._error(key, version, str(error))
            outcome, note = "failed", "could not page through the project's tasks"
        except Exception as error:  # a bug must not end the thread that serves every project
            log.exception("project %s: refreshing predictions to %s failed", key or "-", version)
            self._error(key, version, f"{type(error).__name__}: {error}")
            outcome, note = "failed", None
        self._update(key, version, state=outcome, finished=time.time(), note=note)
        status = self.status(key)
        if status is not None and status.version == version:
            log.info(
                "project %s: predictions refresh to %s %s: %d refreshed, %d already current, %d unlabeled, %d errors",
                key or "-",
                version,
                outcome,
                status.refreshed,
                status.current,
                status.unlabeled,
                status.errors,
            )

    def _refresh_tasks(
        self, key: str, version: str, project: ServedProject, stopping: threading.Event
    ) -> tuple[str, str | None]:
        """(final state, note) of refreshing `project` to `version`."""
        api = LabelStudioApi(project.runtime, key)
        own = own_versions(project, self._served_versions(key))
        limit = RateLimit(self.rate, stopping)
        refreshed = 0
        batch: list[tuple[dict, list[dict]]] = []
        for task in api.tasks(lambda count: self._count_listed(key, version, count)):
            if stopping.is_set():
                return "stopped", "the server stopped"
            if self._superseded(key, version):
                return "superseded", "a newer version is served"
            if not is_unlabeled(task):
                continue
            self._bump(key, version, "unlabeled")
            if not limit.wait(1):
                return "stopped", "the server stopped"
            try:
                # a count of 0 spares a call; a missing or odd count is looked up
                predictions = [] if task.get("total_predictions") == 0 else api.predictions(task["id"])
            except RefreshError as error:
                self._error(key, version, str(error))
                continue
            if any(p.get("model_version") == version for p in predictions):
                self._bump(key, version, "current")
                continue
            if refreshed + len(batch) >= self.max_tasks:
                break
            batch.append((task, predictions))
            if len(batch) == BATCH:
                refreshed += self._write_batch(key, version, project, api, batch, own)
                batch = []
        if batch and not stopping.is_set():
            refreshed += self._write_batch(key, version, project, api, batch, own)
        if refreshed >= self.max_tasks:
            return "done", f"stopped at SEG_REFRESH_MAX_TASKS={self.max_tasks} tasks"
        return "done", None

    def _served_versions(self, key: str) -> set[str]:
        with self._lock:
            return set(self._history.get(key, ())) | self.fallback_versions

    def _count_listed(self, key: str, version: str, count: int) -> None:
        with self._lock:
            status = self._status.get(key)
            if status is not None and status.version == version:
                self._status[key] = dataclasses.replace(status, listed=status.listed + count)

    def _bump(self, key: str, version: str, name: str, by: int = 1) -> None:
        with self._lock:
            status = self._status.get(key)
            if status is not None and status.version == version:
                self._status[key] = dataclasses.replace(status, **{name: getattr(status, name) + by})

    def _write_batch(
        self,
        key: str,
        version: str,
        project: ServedProject,
        api: LabelStudioApi,
        batch: list[tuple[dict, list[dict]]],
        own: set[str],
    ) -> int:
        """Predict `batch` ((task, its predictions when listed) pairs), write what came out at
        `version` unless a task has it by then, and delete the task's older predictions of ours (as
        read just before the write); the number of tasks written."""
        tasks = [task for task, _ in batch]
        try:
            response = project.predict(tasks)
        except BackendError as error:
            self._error(key, version, f"task {tasks[0].get('id')}: {error.message}")
            return 0
        predictions = list(response.predictions) if response is not None else []
        if len(predictions) != len(tasks):  # no model any more, or a broken answer: write nothing
            self._error(key, version, f"the model answered {len(predictions)} predictions for {len(tasks)} tasks")
            return 0
        written = 0
        for (task, _listed), prediction in zip(batch, predictions, strict=True):
            if prediction.get("model_version") != version:  # another version took over meanwhile
                continue
            if prediction.get("error"):
                self._error(key, version, f"task {task['id']}: {prediction['error']}")
                continue
            try:
                # Read again just before writing: Label Studio stores its own /predict answer when
                # someone opens the task meanwhile, and a second copy of this version would follow.
                latest = api.predictions(task["id"])
                if any(old.get("model_version") == version for old in latest):
                    self._bump(key, version, "current")
                    continue
                api.create_prediction(task["id"], prediction)
            except RefreshError as error:
                self._error(key, version, str(error))
                continue
            written += 1
            self._bump(key, version, "refreshed")
            for old in latest:
                if old.get("model_version") != version and is_own_version(old.get("model_version"), own):
                    try:
                        api.delete_prediction(old["id"])
                    except RefreshError as error:
                        self._error(key, version, str(error))
        return written


def own_versions(project: ServedProject, served: set[str]) -> set[str]:
    """The version names this backend has given: the project's and MODEL_DIR's saved versions,
    `served` (what this process served, the fallback model's) and "untrained"."""
    project_dir = Path(project.project_dir)
    names = {info.version for folder in (project_dir, project_dir.parent) for info in list_versions(folder)}
    return names | served | {UNTRAINED}


def _positive_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class LabelStudioApi:
    """The calls a refresh makes, each answer checked: RefreshError says what was wrong."""

    def __init__(self, runtime: BackendRuntime, project_id: str):
        if not project_id.isdigit():
            raise RefreshError(f"project id {project_id!r} is not a Label Studio project number")
        self._client = runtime.label_studio
        self.project_id = project_id

    def _call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        try:
            return self._client.call_api(method, path, timeout_s=30.0, **kwargs)
        except BackendError as error:
            raise RefreshError(error.message) from None

    def tasks(self, listed: Callable[[int], None]) -> Iterator[dict]:
        """The project's tasks, page by page (`listed(n)` after each page); only dicts with a
        positive integer id and a dict `data`. Raises RefreshError when a page cannot be read."""
        seen: set[int] = set()
        for page in range(1, MAX_PAGES + 1):
            params = {"project": self.project_id, "page": page, "page_size": PAGE_SIZE, "include": TASK_FIELDS}
            status, answer = self._call("GET", "/api/tasks", params=params)
            if status == 404 and page > 1:  # past the last page
                return
            if status != 200:
                raise RefreshError(f"Label Studio answered HTTP {status} to GET /api/tasks page {page}")
            tasks = answer.get("tasks") if isinstance(answer, dict) else None
            if not isinstance(tasks, list) or len(tasks) > PAGE_SIZE:
                raise RefreshError(f"GET /api/tasks page {page}: not a page of at most {PAGE_SIZE} tasks")
            fresh: list[dict] = []
            for task in tasks:
                usable = isinstance(task, dict) and _positive_id(task.get("id")) and isinstance(task.get("data"), dict)
                if usable and task["id"] not in seen:
                    seen.add(task["id"])
                    fresh.append(task)
            listed(len(fresh))
            yield from fresh
            if len(tasks) < PAGE_SIZE:
                return

    def predictions(self, task_id: int) -> list[dict]:
        """The task's predictions (dicts with a positive integer `id`)."""
        try:
            status, answer = self._call("GET", "/api/predictions/", params={"task": task_id})
        except RefreshError as error:
            raise RefreshError(f"task {task_id}: {error}") from None
        if status != 200:
            raise RefreshError(f"task {task_id}: Label Studio answered HTTP {status} to GET /api/predictions/")
        if not isinstance(answer, list):
            raise RefreshError(f"task {task_id}: GET /api/predictions/ answered something other than a list")
        if len(answer) > MAX_PREDICTIONS_READ:
            raise RefreshError(f"task {task_id}: more than {MAX_PREDICTIONS_READ} predictions; left as they are")
        return [p for p in answer if isinstance(p, dict) and _positive_id(p.get("id")) and p.get("task") == task_id]

    def create_prediction(self, task_id: int, prediction: dict) -> None:
        body = {
            "task": task_id,
            "result": prediction.get("result", []),
            "score": prediction.get("score"),
            "model_version": prediction.get("model_version"),
        }
        # NumPy numbers (RLE counts, scores) as plain JSON, as the server's answers render them
        body = orjson.loads(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))
        status, _ = self._call("POST", "/api/predictions/", body=body)
        if status != 201 and status != 200:
            raise RefreshError(f"task {task_id}: Label Studio answered HTTP {status} to POST /api/predictions/")

    def delete_prediction(self, prediction_id: int) -> None:
        status, _ = self._call("DELETE", f"/api/predictions/{prediction_id}/")
        if status not in (200, 204, 404):  # 404: deleted meanwhile, which is what we wanted
            raise RefreshError(f"Label Studio answered HTTP {status} to DELETE prediction {prediction_id}")
