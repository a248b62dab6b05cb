"""The trained segmentation backend (port 7070): pre-annotates tasks, trains itself from annotations.

The story, in order:
- startup: pick the device, clean up interrupted version writes, note the fallback model
  (SEG_CHECKPOINT, else MODEL_DIR's own current version, e.g. one trained offline).
- predict: the project's current model segments every task's whole image (batched, tiled, never
  resized); each class present becomes one `brushlabels` region (plus `polygonlabels` where the
  config has PolygonLabels), scored by its mean confidence; the task's score says how sure the
  model is overall, so Label Studio can sort by uncertainty. No model yet: empty results.
- fit: START_TRAINING trains; ANNOTATION_CREATED/UPDATED trains once TRAIN_EVERY new annotations
  have arrived. fit runs inside the webhook request (FIT_IN_REQUEST) and only queues a run: one
  training queue for all projects runs TRAIN_CONCURRENCY runs at once with at most TRAIN_QUEUE_MAX
  waiting (beyond it the webhook gets a 429 with a message); a project already queued or training
  is not queued twice (the answer says so). A run fetches the project's annotations from Label
  Studio, trains for TRAIN_MINUTES, saves a new version atomically and only then serves it.
  Progress and problems are in /health and /metrics.
- The server keeps MAX_PROJECTS projects; `forget_project` drops an evicted project's state,
  /health entry and metric series (a queued or training project is never evicted).

Versions of project P live in MODEL_DIR/project-P/ (see segmentation/versions.py).
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from backends.errors import BackendError, LabelStudioUnavailable, TooManyRequests
from backends.server.model_base import BackendContext, LabelStudioMLBase, ModelResponse
from backends.images.pixel_budget import holding_image
from backends.server.protocol import image_uri_of
from backends.label_studio.regions import brush_region, polygon_regions
from backends.server.work_queue import KeyedQueue, QueueFull
from segmentation.data import SampleStore, samples_from_tasks
from segmentation.tiled_inference import segment_images
from segmentation.network import resolve_device
from segmentation.trainer import Progress, TrainConfig, train
from segmentation.versions import (
    LOAD_ERRORS,
    METRICS_FILE,
    LoadedModel,
    current_version,
    list_versions,
    load_version,
    remove_incomplete,
)

log = logging.getLogger(__name__)

UNTRAINED = "untrained"
# Upper bound of brush RLE bytes per run of a mask (a token is at most 1 + 2 + 16 + 8 bits).
RLE_BYTES_PER_RUN = 27 / 8
TRAINING_SAMPLES_PREFIX = ".training-samples-"  # decoded training data of a run, under project-P/
MAX_REPORTED_PROBLEMS = 10
MAX_REPORTED_CHARS = 200  # per problem or error message in /health
MAX_REPORTED_LABELS = 50  # model_labels listed per project in /health


@dataclass
class ProjectState:
    """What the process knows about one project's model and its training (guarded by `lock`)."""

    model: LoadedModel | None = None
    new_annotations: int = 0
    training: dict[str, Any] = field(default_factory=lambda: {"state": "idle"})
    lock: threading.Lock = field(default_factory=threading.Lock)


class SegmentationBackend(LabelStudioMLBase):
    """U-Net pre-annotation for BrushLabels / PolygonLabels projects, trained on their annotations."""

    MODEL_VERSION = UNTRAINED
    TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "START_TRAINING")
    FIT_IN_REQUEST = True  # fit counts or queues (milliseconds): the webhook answers with the outcome

    _context: ClassVar[BackendContext | None] = None
    _projects: ClassVar[dict[str, ProjectState]] = {}
    _fallback: ClassVar[LoadedModel | None] = None
    _fallback_error: ClassVar[str | None] = None  # why the fallback model could not be loaded
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()
    _inference_lock: ClassVar[threading.Lock] = threading.Lock()  # one forward pass at a time
    _training_queue: ClassVar[KeyedQueue]

    # -- process start ---------------------------------------------------------------------------

    @classmethod
    def startup(cls, context: BackendContext) -> None:
        cls._context = context
        cls._projects = {}
        settings = context.settings
        cls._training_queue = KeyedQueue(settings.train_concurrency, settings.train_queue_max, name="training")
        cls._device = resolve_device(context.settings.device)
        model_dir = Path(context.settings.model_dir)
        for folder in [model_dir, *model_dir.glob("project-*")]:
            for leftover in remove_incomplete(folder):
                log.warning("removed %s, left by an interrupted training run", leftover)
            for leftover in folder.glob(TRAINING_SAMPLES_PREFIX + "*"):
                shutil.rmtree(leftover, ignore_errors=True)
                log.warning("removed %s, left by an interrupted training run", leftover)
        cls._fallback = cls._load_fallback(context.settings)
        metrics = context.metrics
        cls._gauges = {
            "training": metrics.gauge("seg_training_active", "1 while a training run is going", ["project"]),
            "epoch": metrics.gauge("seg_training_epoch", "epoch of the current or last run", ["project"]),
            "loss": metrics.gauge("seg_training_loss", "training loss of the latest step", ["project"]),
            "val": metrics.gauge("seg_validation_dice", "mean validation Dice of the served model", ["project"]),
        }
        cls._runs = metrics.counter("seg_training_runs", "training runs by outcome", ["project", "outcome"])
        cls._skipped = metrics.counter("seg_training_skipped", "tasks or regions skipped as unusable", ["project"])

    @classmethod
    def _load_fallback(cls, settings) -> LoadedModel | None:
        """SEG_CHECKPOINT (a version folder, or a MODEL_DIR-like folder of versions), else
        MODEL_DIR's own current version, for projects without a model of their own yet.
        A model that cannot be loaded (a refused pickle included) is logged and reported in /health,
        and the backend starts without it."""
        folder = Path(settings.seg_checkpoint or settings.model_dir)
        cls._fallback_error = None
        try:
            if (folder / METRICS_FILE).is_file():
                return load_version(folder, cls._device)
            name = current_version(folder)
            if name is None and settings.seg_checkpoint:
                log.error("SEG_CHECKPOINT=%s holds no model version written by this trainer", folder)
            return load_version(folder / name, cls._device) if name else None
        except LOAD_ERRORS as error:
            log.error("cannot load the model in %s: %s", folder, error)
            first_line = next(iter(str(error).splitlines()), "")
            cls._fallback_error = f"cannot load the model in {folder}: {type(error).__name__}: {first_line}"[:300]
            return None

    # -- per project -----------------------------------------------------------------------------

    @property
    def state(self) -> ProjectState:
        """The project's state, shared by its instances; an instance keeps the one it found, so an
        instance still serving after its project was evicted never re-adds it."""
        state = self.__dict__.get("_state")
        if state is None:
            with self._registry_lock:
                state = self._projects.setdefault(self.project_id or "", ProjectState())
            self._state = state
        return state

    @classmethod
    def project_busy(cls, project_id: str) -> bool:
        return cls._training_queue.state(project_id) is not None

    @classmethod
    def forget_project(cls, project_id: str) -> None:
        """Drop the evicted project's state (its loaded model too: reloaded from disk if it returns)
        and its metric series, so /health and /metrics list only the projects in memory."""
        with cls._registry_lock:
            cls._projects.pop(project_id, None)
        project = project_id or "default"
        series = [(gauge, (project,)) for gauge in cls._gauges.values()]
        series += [(cls._runs, (project, outcome)) for outcome in ("ok", "failed")] + [(cls._skipped, (project,))]
        for metric, labels in series:
            try:
                metric.remove(*labels)
            except KeyError:  # never reported for this project
                pass

    @property
    def project_dir(self) -> Path:
        return Path(self.context.settings.model_dir) / f"project-{self.project_id or 'default'}"

    def setup(self) -> None:
        served = self.served_model()
        self.model_version = served.info.version if served else UNTRAINED

    def served_model(self) -> LoadedModel | None:
        """The project's current version (loaded once), else the fallback model, else None."""
        state = self.state
        with state.lock:
            if state.model is None:
                name = current_version(self.project_dir)
                try:
                    state.model = load_version(self.project_dir / name, self._device) if name else None
                except LOAD_ERRORS as error:  # keep serving the fallback
                    log.error("project %s: cannot load version %s: %s", self.project_id, name, error)
            return state.model or self._fallback

    # -- predict ---------------------------------------------------------------------------------

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> ModelResponse:
        model = self.served_model()
        if model is None:  # nothing trained yet: empty pre-annotations, explained in /health
            return ModelResponse(model_version=UNTRAINED, predictions=[{"result": [], "score": 0.0} for _ in tasks])
        config = self.parsed_label_config
        image_name = config.output_image()  # an Image tag, whatever the output tag's first toName is
        image_key = config.images[image_name]
        single = len(tasks) == 1
        predictions = [self._predict_task(model, task, image_name, image_key, single) for task in tasks]
        return ModelResponse(model_version=model.info.version, predictions=predictions)

    def _predict_task(self, model: LoadedModel, task: dict, image_name: str, image_key: str, single: bool) -> dict:
        """One task's prediction. Its image is decoded, segmented and turned into regions while its
        pixels hold their share of the decode budget (DECODE_MAX_INFLIGHT_MEGAPIXELS), then
        dropped: a batch of any length holds one image at a time. A failed image gives an empty
        prediction that says why (an error when it is the only task: the annotator opened it)."""
        task_id = task.get("id") if isinstance(task, dict) else None
        try:
            with holding_image(self.context.images, image_uri_of(task, image_key), task_id) as image:
                with self._inference_lock:
                    (segmentation,) = segment_images(model.network, [image.pixels], model.device,
                                                     size_multiple=model.info.network.size_multiple)
                regions, notes = self._regions(segmentation, model.info.labels, image_name)
        except BackendError as error:
            if single:
                raise
            log.warning("task %s: no prediction, %s", task_id, error.message)
            return {"result": [], "score": 0.0, "model_version": model.info.version, "error": error.message}
        prediction = {"result": regions, "score": segmentation.score, "model_version": model.info.version}
        if notes:
            log.warning("task %s: %s", task_id, "; ".join(notes))
            prediction["error"] = "; ".join(notes)
        return prediction

    def _regions(self, segmentation, model_labels: tuple[str, ...], image_name: str) -> tuple[list[dict], list[str]]:
        """One brushlabels region per class present (and polygons where the config has them), and
        a note for each label left out.

        The model's classes are matched to the config by label name: labels the project no longer
        has are dropped; labels it added are predicted once a model is trained with them. A label
        whose mask is so fragmented that the task's brush RLE would pass SEG_MAX_RLE_MB (estimated
        from its runs before encoding) is left out: Label Studio cannot use such an answer.
        """
        config = self.parsed_label_config
        brush, polygon = config.brush_for(image_name), config.polygon_for(image_name)
        height, width = segmentation.mask.shape
        budget = self.context.settings.seg_max_rle_mb * 2**20
        regions: list[dict] = []
        notes: list[str] = []
        for index, score in sorted(segmentation.class_confidence.items()):
            label = model_labels[index - 1]
            wanted_brush = brush is not None and label in brush.labels
            wanted_polygon = polygon is not None and label in polygon.labels
            if not (wanted_brush or wanted_polygon):
                continue
            mask = segmentation.mask == index
            size = mask_runs(mask) * RLE_BYTES_PER_RUN
            if size > budget:
                notes.append(f"label {label!r} left out: its predicted mask is too fragmented (brush RLE of "
                             f"about {size / 2**20:.1f} MiB, more than SEG_MAX_RLE_MB={self.context.settings.seg_max_rle_mb:g})")
                continue
            budget -= size
            if wanted_brush:
                regions.append(brush_region(mask, label, brush, width, height, score=score, to_name=image_name))
            if wanted_polygon:
                regions += polygon_regions(mask, label, polygon, width, height, score=score, to_name=image_name)
        return regions, notes

    # -- fit -------------------------------------------------------------------------------------

    def fit(self, event: str, data: dict, **kwargs: Any) -> dict:
        """Count the annotation or queue a training run; returns what happened, for the webhook's
        answer: {"training": "waiting" | "queued" | "already queued" | "already running", ...}.
        Raises TooManyRequests when the training queue is full (the annotation count is kept, so a
        later annotation tries again)."""
        state = self.state
        with state.lock:
            if event != "START_TRAINING":
                state.new_annotations += 1
                if state.new_annotations < self.context.settings.train_every:
                    return {"training": "waiting", "new_annotations": state.new_annotations,
                            "train_every": self.context.settings.train_every}
            outcome = self._queue_training(event)
            if outcome == "queued":
                state.new_annotations = 0
                state.training = {"state": "queued", "reason": event, "queued": time.time()}
        answer: dict[str, Any] = {"training": outcome}
        position = self._training_queue.position(self.project_id or "")
        if position is not None:
            answer["position"] = position
        return answer

    def _queue_training(self, event: str) -> str:
        """Put a run of this project in the training queue: "queued", "already queued" or
        "already running"; TooManyRequests when TRAIN_QUEUE_MAX runs already wait."""
        queue = self._training_queue
        try:
            return queue.submit(self.project_id or "", self._run_queued)
        except QueueFull as full:
            raise TooManyRequests(
                f"the training queue is full: {full.running} running and {full.waiting} waiting "
                f"(TRAIN_CONCURRENCY={queue.workers}, TRAIN_QUEUE_MAX={queue.max_waiting}); "
                f"{event} for project {self.project_id or '-'} was not queued, send it again later"
            ) from None

    def _run_queued(self) -> None:
        """A training slot is free: run, unless the server is stopping."""
        if self.context.stopping.is_set():
            self._report(state="idle", finished=time.time(), note="not run: the server was stopping")
            return
        with self.state.lock:
            reason = self.state.training.get("reason")
            self.state.training = {"state": "training", "reason": reason, "started": time.time(), "epoch": 0}
        self._train()

    def _train(self) -> None:
        """The training thread: annotations -> samples -> new version -> served."""
        project = self.project_id or "default"
        settings = self.context.settings
        self._gauges["training"].labels(project).set(1)
        stack = contextlib.ExitStack()  # removes the run's decoded samples, whatever happens
        try:
            if not self.label_config:  # a webhook arrived before any /setup: ask Label Studio
                self.use_label_config(self._label_studio_get(f"/api/projects/{self.project_id}")["label_config"])
            labels = self.parsed_label_config.output_labels()
            self.project_dir.mkdir(parents=True, exist_ok=True)
            samples_dir = stack.enter_context(
                tempfile.TemporaryDirectory(prefix=TRAINING_SAMPLES_PREFIX, dir=self.project_dir))
            samples, problems = self._training_samples(labels, SampleStore(Path(samples_dir)))
            self._report(problems=[_short(problem) for problem in problems[:MAX_REPORTED_PROBLEMS]],
                         problem_count=len(problems), samples=len(samples))
            if problems:
                self._skipped.labels(project).inc(len(problems))
                log.warning("project %s: %d problems in the training data, e.g. %s", project, len(problems), problems[0])
            if not samples:
                raise ValueError("no usable annotated task: nothing to train on")
            config = TrainConfig(minutes=settings.train_minutes, device=str(self._device),
                                 val_fraction=settings.val_fraction)
            info = train(samples, labels, self.project_dir, config, progress=self._on_progress,
                         should_stop=self.context.stopping.is_set,
                         extra_training={"project": project, "problem_count": len(problems)})
            model = load_version(info.path, self._device)  # written and promoted: now serve it
            with self.state.lock:
                self.state.model = model
            self.model_version = info.version
            self._gauges["val"].labels(project).set(info.metrics["val_mean_dice"])
            self._report(state="idle", model_version=info.version, finished=time.time(),
                         val_dice=info.metrics["val_dice"], val_iou=info.metrics["val_iou"])
            self._runs.labels(project, "ok").inc()
            log.info("project %s: version %s trained on %d tasks, val mean Dice %.3f",
                     project, info.version, len(samples), info.metrics["val_mean_dice"])
        except Exception as error:  # the served model stays; the failure is reported, not raised
            message = error.message if isinstance(error, BackendError) else f"{type(error).__name__}: {error}"
            log.error("project %s: training failed: %s", project, message, exc_info=not isinstance(error, (BackendError, ValueError)))
            self._report(state="failed", error=_short(message), finished=time.time())
            self._runs.labels(project, "failed").inc()
        finally:
            stack.close()
            self._gauges["training"].labels(project).set(0)

    def _training_samples(self, labels: tuple[str, ...], store: SampleStore):
        """(samples, problems) from the project's annotated tasks; each decoded image and mask goes
        to `store` (disk) at once, so memory holds one image whatever the number of tasks."""
        config = self.parsed_label_config
        image_name = config.output_image()  # an Image tag, whatever the output tag's first toName is
        output_names = [tag.name for tag in config.output_tags() if tag.targets(image_name)]
        label_map = {label: index for index, label in enumerate(labels, start=1)}
        tasks = self._labelled_tasks()
        return samples_from_tasks(tasks, config.images[image_name], output_names, label_map,
                                  lambda uri, task_id: self.context.images.load(uri, task_id).pixels, store=store,
                                  max_polygon_vertices=self.context.settings.polygon_max_vertices)

    def _labelled_tasks(self) -> list[dict]:
        """The project's annotated tasks through Label Studio's export API (JSON, annotations inline)."""
        return self._label_studio_get(f"/api/projects/{self.project_id}/export",
                                      {"exportType": "JSON", "download_all_tasks": "false"})

    def _label_studio_get(self, path: str, params: dict | None = None) -> Any:
        """GET a Label Studio API path as JSON, with the key from settings or /setup."""
        images = self.context.images
        auth = images.auth()
        if auth is None:
            raise LabelStudioUnavailable(
                "cannot reach the Label Studio API: its URL or API key is unknown "
                "(set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or connect the backend in Label Studio)")
        for attempt in range(2):
            # The fetcher attaches the token only for the Label Studio origin and follows no redirect.
            response = images.label_studio_get(path, params=params, timeout_s=120)
            if response.status_code == 401 and attempt == 0:
                auth.on_unauthorized()  # a personal access token's access token expired: refresh once
                continue
            if response.status_code != 200:
                raise LabelStudioUnavailable(f"Label Studio answered HTTP {response.status_code} to GET {path}")
            return response.json()
        raise LabelStudioUnavailable(f"Label Studio refused the API key for GET {path}")

    def _on_progress(self, progress: Progress) -> None:
        project = self.project_id or "default"
        self._gauges["epoch"].labels(project).set(progress.epoch)
        self._gauges["loss"].labels(project).set(progress.loss)
        update = {"epoch": progress.epoch, "step": progress.step, "loss": round(progress.loss, 4),
                  "elapsed_s": round(progress.elapsed_s, 1), "budget_s": progress.budget_s}
        if progress.best_val_score is not None:
            update["best_val_dice"] = round(progress.best_val_score, 4)
        if progress.val_score is not None:
            update["val_dice"] = round(progress.val_score, 4)
        self._report(**update)

    def _report(self, **fields: Any) -> None:
        with self.state.lock:
            self.state.training = {**self.state.training, **fields}

    # -- what the server reports -----------------------------------------------------------------

    @classmethod
    def health(cls) -> dict:
        with cls._registry_lock:
            projects = dict(cls._projects)
        report: dict[str, Any] = {
            "model_state": "ready" if cls._fallback or any(p.model for p in projects.values()) else "no model",
            "fallback_model": cls._fallback.info.version if cls._fallback else None,
            "projects": {},
        }
        if report["model_state"] == "no model":
            report["model_state_detail"] = "no trained model yet: predictions are empty until a training run finishes"
        if cls._fallback_error:
            report["fallback_model_error"] = cls._fallback_error
        running, waiting = cls._training_queue.counts()
        report["training_queue"] = {"running": running, "waiting": waiting,
                                    "concurrency": cls._training_queue.workers,
                                    "max_waiting": cls._training_queue.max_waiting}
        for project, state in projects.items():
            with state.lock:
                served = state.model or cls._fallback
                report["projects"][project] = {
                    "model_version": served.info.version if served else UNTRAINED,
                    "model_labels": list(served.info.labels[:MAX_REPORTED_LABELS]) if served else [],
                    "new_annotations": state.new_annotations,
                    **state.training,
                }
        return report

    @classmethod
    def versions(cls) -> list:
        if cls._context is None:
            return []
        model_dir = Path(cls._context.settings.model_dir)
        folders = [(None, model_dir)] + [(p.name.removeprefix("project-"), p) for p in sorted(model_dir.glob("project-*"))]
        listed = []
        for project, folder in folders:
            current = current_version(folder)
            for info in list_versions(folder):
                listed.append({"version": info.version, "project": project, "created": info.created,
                               "labels": list(info.labels), "current": info.version == current,
                               "val_dice": info.metrics.get("val_dice"), "val_iou": info.metrics.get("val_iou")})
        return listed


def _short(message: Any) -> str:
    """A message cut to MAX_REPORTED_CHARS for /health (problems quote URIs, which can be long)."""
    text = str(message)
    return text if len(text) <= MAX_REPORTED_CHARS else text[: MAX_REPORTED_CHARS - 3] + "..."


def mask_runs(mask: np.ndarray) -> int:
    """Runs of equal pixels in an HxW bool mask read row-major, as brush RLE encodes it."""
    flat = mask.ravel()
    return 1 + int(np.count_nonzero(flat[1:] != flat[:-1])) if flat.size else 0
