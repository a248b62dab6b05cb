"""What the segmentation backend keeps for the life of the process, shared by every project.

`SegmentationBackend.startup` builds one `SegmentationService`; the server holds it and hands it to
each project's model instance (`self.service`). It holds the device, the fallback model, one
`ProjectState` per project in memory (its loaded model, annotation count and `TrainingStatus`),
the training queue, the lock that allows one forward pass at a time, the training metrics and the
prediction refresher (segmentation/refresh.py), and answers what the server asks: /health,
/versions and whether a project may be evicted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge

from backends.devices import resolve_device
from backends.metrics import Metrics
from backends.server.model_base import BackendService
from backends.server.work_queue import KeyedQueue
from backends.settings import Settings
from segmentation.refresh import PredictionRefresher
from segmentation.versions import (
    LOAD_ERRORS,
    METRICS_FILE,
    LoadedModel,
    current_version,
    list_versions,
    load_version,
    remove_incomplete,
)
from segmentation.zero_shot import load_zero_shot, zero_shot_source

if TYPE_CHECKING:
    from segmentation.job_queue import TrainingJobs

log = logging.getLogger(__name__)

UNTRAINED = "untrained"
TRAINING_SAMPLES_PREFIX = ".training-samples-"  # decoded training data of a run, under project-P/
MAX_REPORTED_LABELS = 50  # model_labels listed per project in /health
MAX_HISTORY_POINTS = 200  # per plotted series of a training run (status page)


@dataclass(frozen=True)
class TrainingStatus:
    """A project's latest training run as /health shows it. Fields not reported (yet) are None and
    left out of the report; times are Unix seconds."""

    state: str = "idle"  # idle | queued | training | failed
    reason: str | None = None  # the webhook event that asked for the run
    queued: float | None = None
    started: float | None = None
    finished: float | None = None
    epoch: int | None = None
    step: int | None = None
    loss: float | None = None  # of the latest step
    elapsed_s: float | None = None
    budget_s: float | None = None  # TRAIN_MINUTES, in seconds
    val_dice: float | dict[str, float | None] | None = None  # mean while training; per label once done
    best_val_dice: float | None = None
    val_iou: dict[str, float | None] | None = None  # per label, once done
    samples: int | None = None  # usable annotated tasks
    problems: list[str] | None = None  # the first few problems in the training data, shortened
    problem_count: int | None = None
    model_version: str | None = None  # the version the run produced
    error: str | None = None  # why the run failed
    note: str | None = None

    def updated(self, **fields: Any) -> TrainingStatus:
        """This status with `fields` replaced (a TypeError for a field that does not exist)."""
        return dataclasses.replace(self, **fields)

    def report(self) -> dict[str, Any]:
        """The fields set, for /health."""
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}


class TrainingHistory:
    """The latest run's points for the status page's plots: the loss after each step and the
    validation Dice after each epoch, each series at most `capacity` points (thread-safe).

    A full series drops every other point, so it still covers the whole run at half the
    resolution. A step point whose step is not above the previous one starts a new run.
    """

    def __init__(self, capacity: int = MAX_HISTORY_POINTS):
        self.capacity = max(capacity, 2)
        self._loss: list[tuple[int, float, float]] = []  # (step, loss, elapsed_s)
        self._val_dice: list[tuple[int, float, float]] = []  # (step, mean Dice, elapsed_s)
        self._lock = threading.Lock()

    def add(self, step: int, loss: float, elapsed_s: float, val_dice: float | None = None) -> None:
        """A step's loss, or (with `val_dice`) the validation that followed it."""
        with self._lock:
            if val_dice is not None:
                self._append(self._val_dice, (step, round(val_dice, 4), round(elapsed_s, 1)))
                return
            if self._loss and step <= self._loss[-1][0]:
                self._loss.clear()
                self._val_dice.clear()
            self._append(self._loss, (step, round(loss, 4), round(elapsed_s, 1)))

    def report(self) -> dict[str, list[list[float]]]:
        with self._lock:
            return {"loss": [list(p) for p in self._loss], "val_dice": [list(p) for p in self._val_dice]}

    def _append(self, series: list[tuple[int, float, float]], point: tuple[int, float, float]) -> None:
        if len(series) >= self.capacity:
            del series[1::2]  # keep the first point; the newest is appended below
        series.append(point)


@dataclass
class ProjectState:
    """What the process knows about one project's model and its training (guarded by `lock`;
    `history` has its own)."""

    model: LoadedModel | None = None
    loaded_version: str | None = None  # the version `model` was loaded from (or last failed to load)
    version_checked: float = float("-inf")  # time.monotonic() of the last look at `current`
    new_annotations: int = 0
    training: TrainingStatus = field(default_factory=TrainingStatus)
    history: TrainingHistory = field(default_factory=TrainingHistory)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class TrainingMetrics:
    """The training series in /metrics, labelled by project ("default" for none)."""

    active: Gauge
    epoch: Gauge
    loss: Gauge
    val_dice: Gauge
    runs: Counter  # labels: project, outcome (ok | failed)
    skipped: Counter

    @classmethod
    def register(cls, metrics: Metrics) -> TrainingMetrics:
        return cls(
            active=metrics.gauge("seg_training_active", "1 while a training run is going", ["project"]),
            epoch=metrics.gauge("seg_training_epoch", "epoch of the current or last run", ["project"]),
            loss=metrics.gauge("seg_training_loss", "training loss of the latest step", ["project"]),
            val_dice=metrics.gauge("seg_validation_dice", "mean validation Dice of the served model", ["project"]),
            runs=metrics.counter("seg_training_runs", "training runs by outcome", ["project", "outcome"]),
            skipped=metrics.counter("seg_training_skipped", "tasks or regions skipped as unusable", ["project"]),
        )

    def forget(self, project: str) -> None:
        """Remove every series of `project`."""
        series: list[tuple[Any, tuple[str, ...]]] = [
            (gauge, (project,)) for gauge in (self.active, self.epoch, self.loss, self.val_dice)
        ]
        series += [(self.runs, (project, outcome)) for outcome in ("ok", "failed")] + [(self.skipped, (project,))]
        for metric, labels in series:
            with contextlib.suppress(KeyError):  # never reported for this project
                metric.remove(*labels)


def remove_interrupted_runs(model_dir: Path, older_than_s: float = 0.0) -> None:
    """Delete what interrupted training runs left in MODEL_DIR and its project folders: half-written
    versions and decoded training samples (only those older than `older_than_s` where other
    processes share MODEL_DIR: see versions.remove_incomplete)."""
    for folder in [model_dir, *model_dir.glob("project-*")]:
        for leftover in remove_incomplete(folder, older_than_s):
            log.warning("removed %s, left by an interrupted training run", leftover)
        for leftover in folder.glob(TRAINING_SAMPLES_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
            log.warning("removed %s, left by an interrupted training run", leftover)


def load_fallback(settings: Settings, device: str) -> tuple[LoadedModel | None, str | None]:
    """(model, why it could not be loaded): SEG_CHECKPOINT (a version folder, or a MODEL_DIR-like
    folder of versions), else MODEL_DIR's own current version, for projects without a model of
    their own yet. A model that cannot be loaded (a refused pickle included) is logged and reported
    in /health, and the backend starts without it. A pretrained model (SEG_CHECKPOINT=hf:<id> or a
    save_pretrained folder, or SEG_MODEL=hf:<id> while nothing is trained) pre-annotates zero-shot
    with its classes mapped to labels by SEG_LABEL_MAP (segmentation/zero_shot.py)."""
    folder = Path(settings.seg_checkpoint or settings.model_dir)
    try:
        source = zero_shot_source(settings.seg_checkpoint, settings.seg_model, current_version(folder) is not None)
        if source:
            folder = Path(source)
            return load_zero_shot(source, settings.seg_label_map, settings.seg_allow_hub, device), None
        if (folder / METRICS_FILE).is_file():
            return load_version(folder, device), None
        name = current_version(folder)
        if name is None and settings.seg_checkpoint:
            log.error("SEG_CHECKPOINT=%s holds no model version written by this trainer", folder)
        return (load_version(folder / name, device) if name else None), None
    except LOAD_ERRORS as error:
        log.error("cannot load the model in %s: %s", folder, error)
        first_line = next(iter(str(error).splitlines()), "")
        return None, f"cannot load the model in {folder}: {type(error).__name__}: {first_line}"[:300]


class SegmentationService(BackendService):
    """The device, the fallback model, the projects in memory, the training queue (TRAIN_CONCURRENCY
    runs at once, TRAIN_QUEUE_MAX waiting), one forward pass at a time, the training metrics, and
    the refresher that brings unlabeled tasks' predictions to each newly served version."""

    def __init__(self, settings: Settings, metrics: Metrics, training_jobs: TrainingJobs | None = None):
        super().__init__()
        self.model_dir = Path(settings.model_dir)
        self.device = resolve_device(settings.device)
        self.fallback, self.fallback_error = load_fallback(settings, self.device)
        self.training_queue = KeyedQueue(settings.train_concurrency, settings.train_queue_max, name="training")
        self.training_jobs = training_jobs  # REDIS_URL: runs go to RQ workers instead (segmentation/job_queue.py)
        self.inference_lock = threading.Lock()  # one forward pass at a time
        self.metrics = TrainingMetrics.register(metrics)
        # new versions' predictions into Label Studio, in place of the older ones (the fallback's too)
        self.refresher = PredictionRefresher(settings, [self.fallback.info.version] if self.fallback else [])
        self._projects: dict[str, ProjectState] = {}
        self._projects_lock = threading.Lock()

    def project(self, project_id: str) -> ProjectState:
        """The project's state, created on first use."""
        with self._projects_lock:
            return self._projects.setdefault(project_id, ProjectState())

    def project_busy(self, project_id: str) -> bool:
        return self.training_queue.state(project_id) is not None

    def forget_project(self, project_id: str) -> None:
        """Drop the evicted project's state (its loaded model too: reloaded from disk if it returns)
        and its metric series, so /health and /metrics list only the projects in memory."""
        with self._projects_lock:
            self._projects.pop(project_id, None)
        self.metrics.forget(project_id or "default")
        self.refresher.forget(project_id)

    def health(self) -> dict:
        with self._projects_lock:
            projects = dict(self._projects)
        fallback = self.fallback
        report: dict[str, Any] = {
            "model_state": "ready" if fallback or any(p.model for p in projects.values()) else "no model",
            "fallback_model": fallback.info.version if fallback else None,
            # which labels the fallback can predict (a zero-shot model's merged classes), from which model
            "fallback_labels": list(fallback.info.labels[:MAX_REPORTED_LABELS]) if fallback else [],
            "fallback_source": str(fallback.info.training.get("zero_shot", fallback.info.path)) if fallback else None,
            "device": str(self.device),
            "projects": {},
        }
        if report["model_state"] == "no model":
            report["model_state_detail"] = "no trained model yet: predictions are empty until a training run finishes"
        if self.fallback_error:
            report["fallback_model_error"] = self.fallback_error
        queue = self.training_queue
        running, waiting = queue.counts()
        report["training_queue"] = {
            "running": running,
            "waiting": waiting,
            "concurrency": queue.workers,
            "max_waiting": queue.max_waiting,
        }
        remote: dict[str, dict] = {}  # statuses of runs on RQ workers, by project
        if self.training_jobs is not None:
            report["training_queue"], remote = self.training_jobs.health(list(projects))
            if "error" in report["training_queue"]:
                report["status"] = "DEGRADED"
        report["refresh"] = self.refresher.report()
        for project, state in projects.items():
            with state.lock:
                served = state.model or fallback
                report["projects"][project] = {
                    "model_version": served.info.version if served else UNTRAINED,
                    "model_labels": list(served.info.labels[:MAX_REPORTED_LABELS]) if served else [],
                    "new_annotations": state.new_annotations,
                    **(remote.get(project) or state.training.report()),
                }
        return report

    def training_history(self) -> dict[str, dict]:
        with self._projects_lock:
            projects = dict(self._projects)
        return {project: state.history.report() for project, state in projects.items()}

    def versions(self) -> list:
        """Every version in MODEL_DIR (project None) and its project folders, oldest first per folder."""
        model_dir = self.model_dir
        folders = [(None, model_dir)] + [
            (p.name.removeprefix("project-"), p) for p in sorted(model_dir.glob("project-*"))
        ]
        listed = []
        for project, folder in folders:
            current = current_version(folder)
            for info in list_versions(folder):
                listed.append(
                    {
                        "version": info.version,
                        "project": project,
                        "created": info.created,
                        "labels": list(info.labels),
                        "current": info.version == current,
                        "val_dice": info.metrics.get("val_dice"),
                        "val_iou": info.metrics.get("val_iou"),
                    }
                )
        return listed
