"""The trained segmentation backend (port 7070): pre-annotates tasks, trains itself from annotations.

The story, in order:
- startup: clean up interrupted version writes, then build the `SegmentationService` every project
  shares (segmentation/service.py): the device, the fallback model (SEG_CHECKPOINT, else MODEL_DIR's
  own current version, e.g. one trained offline), the training queue, per-project state.
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
  Progress and problems are in /health (a `TrainingStatus` per project) and /metrics.
- The server keeps MAX_PROJECTS projects; the service's `forget_project` drops an evicted project's
  state, /health entry and metric series (a queued or training project is never evicted).

Versions of project P live in MODEL_DIR/project-P/ (see segmentation/versions.py).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from backends.errors import BackendError, TooManyRequests
from backends.images.pixel_budget import holding_image
from backends.label_studio.regions import mask_regions
from backends.server.model_base import BackendRuntime, LabelStudioMLBase, ModelResponse
from backends.server.protocol import image_uri_of
from backends.server.work_queue import QueueFull
from segmentation.data import SampleStore, samples_from_tasks
from segmentation.service import (
    TRAINING_SAMPLES_PREFIX,
    UNTRAINED,
    ProjectState,
    SegmentationService,
    TrainingStatus,
    remove_interrupted_runs,
)
from segmentation.tiled_inference import segment_images
from segmentation.trainer import Progress, TrainConfig, train
from segmentation.versions import LOAD_ERRORS, LoadedModel, current_version, load_version

log = logging.getLogger(__name__)

# Upper bound of brush RLE bytes per run of a mask (a token is at most 1 + 2 + 16 + 8 bits).
RLE_BYTES_PER_RUN = 27 / 8
MAX_REPORTED_PROBLEMS = 10
MAX_REPORTED_CHARS = 200  # per problem or error message in /health


class SegmentationBackend(LabelStudioMLBase):
    """U-Net pre-annotation for BrushLabels / PolygonLabels projects, trained on their annotations."""

    MODEL_VERSION = UNTRAINED
    TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "START_TRAINING")
    FIT_IN_REQUEST = True  # fit counts or queues (milliseconds): the webhook answers with the outcome

    runtime: BackendRuntime
    service: SegmentationService

    # -- process start ---------------------------------------------------------------------------

    @classmethod
    def startup(cls, runtime: BackendRuntime) -> SegmentationService:
        remove_interrupted_runs(Path(runtime.settings.model_dir))  # before the fallback model is looked up
        return SegmentationService(runtime.settings, runtime.metrics)

    # -- per project -----------------------------------------------------------------------------

    @property
    def state(self) -> ProjectState:
        """The project's state, shared by its instances; an instance keeps the one it found, so an
        instance still serving after its project was evicted never re-adds it."""
        state = self.__dict__.get("_state")
        if state is None:
            state = self._state = self.service.project(self.project_id or "")
        return state

    @property
    def project_dir(self) -> Path:
        return Path(self.runtime.settings.model_dir) / f"project-{self.project_id or 'default'}"

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
                    state.model = load_version(self.project_dir / name, self.service.device) if name else None
                except LOAD_ERRORS as error:  # keep serving the fallback
                    log.error("project %s: cannot load version %s: %s", self.project_id, name, error)
            return state.model or self.service.fallback

    # -- predict ---------------------------------------------------------------------------------

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> ModelResponse:
        model = self.served_model()
        if model is None:
            # Nothing trained yet: no prediction at all (explained in /health). Label Studio stores
            # whatever it gets, even an empty one, and then never asks again for that task.
            return ModelResponse(model_version=UNTRAINED, predictions=[])
        config = self.parsed_label_config
        image_name = config.required_primary_image()
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
            with holding_image(self.runtime.images, image_uri_of(task, image_key), task_id) as image:
                with self.service.inference_lock:
                    (segmentation,) = segment_images(
                        model.network, [image.pixels], model.device, size_multiple=model.info.network.size_multiple
                    )
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
        budget = self.runtime.settings.seg_max_rle_mb * 2**20
        regions: list[dict] = []
        notes: list[str] = []
        for index, score in sorted(segmentation.class_confidence.items()):
            label = model_labels[index - 1]
            tags = config.output_tags(image_name, label)
            if not tags:
                continue
            mask = segmentation.mask == index
            size = mask_runs(mask) * RLE_BYTES_PER_RUN
            if size > budget:
                notes.append(
                    f"label {label!r} left out: its predicted mask is too fragmented (brush RLE of "
                    f"about {size / 2**20:.1f} MiB, more than SEG_MAX_RLE_MB={self.runtime.settings.seg_max_rle_mb:g})"
                )
                continue
            budget -= size
            for tag in tags:
                regions += mask_regions(mask, label, tag, score, to_name=image_name)
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
                if state.new_annotations < self.runtime.settings.train_every:
                    return {
                        "training": "waiting",
                        "new_annotations": state.new_annotations,
                        "train_every": self.runtime.settings.train_every,
                    }
            outcome = self._queue_training(event)
            if outcome == "queued":
                state.new_annotations = 0
                state.training = TrainingStatus(state="queued", reason=event, queued=time.time())
        answer: dict[str, Any] = {"training": outcome}
        position = self.service.training_queue.position(self.project_id or "")
        if position is not None:
            answer["position"] = position
        answer["message"] = self._training_message(outcome, position)
        return answer

    def _training_message(self, outcome: str, position: int | None) -> str:
        """One sentence for the admin: Label Studio shows the webhook's answer after Start training."""
        settings = self.runtime.settings
        if outcome == "queued":
            where = f" at position {position + 1} of the queue" if position else ""
            return (
                f"training queued{where}: it reads this project's annotated tasks from Label Studio and trains "
                f"for at most {settings.train_minutes:g} min (TRAIN_MINUTES); a better model becomes the new "
                "version; progress and validation Dice in /health"
            )
        if outcome == "waiting":
            return (
                f"{self.state.new_annotations} of {settings.train_every} new annotations (TRAIN_EVERY): training "
                "starts at that count, or now with Start training"
            )
        return f"a training run of this project is {outcome}: progress in /health"

    def _queue_training(self, event: str) -> str:
        """Put a run of this project in the training queue: "queued", "already queued" or
        "already running"; TooManyRequests when TRAIN_QUEUE_MAX runs already wait."""
        queue = self.service.training_queue
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
        if self.runtime.stopping.is_set():
            self._report(state="idle", finished=time.time(), note="not run: the server was stopping")
            return
        with self.state.lock:
            reason = self.state.training.reason
            self.state.training = TrainingStatus(state="training", reason=reason, started=time.time(), epoch=0)
        self._train()

    def _train(self) -> None:
        """The training thread: annotations -> samples -> new version -> served."""
        project = self.project_id or "default"
        settings = self.runtime.settings
        metrics = self.service.metrics
        metrics.active.labels(project).set(1)
        stack = contextlib.ExitStack()  # removes the run's decoded samples, whatever happens
        try:
            if not self.label_config:  # a webhook arrived before any /setup: ask Label Studio
                project_info = self.runtime.label_studio.get_json(f"/api/projects/{self.project_id}")
                self.use_label_config(project_info["label_config"])
            labels = self.parsed_label_config.output_labels()
            self.project_dir.mkdir(parents=True, exist_ok=True)
            samples_dir = stack.enter_context(
                tempfile.TemporaryDirectory(prefix=TRAINING_SAMPLES_PREFIX, dir=self.project_dir)
            )
            samples, problems = self._training_samples(labels, SampleStore(Path(samples_dir)))
            self._report(
                problems=[_short(problem) for problem in problems[:MAX_REPORTED_PROBLEMS]],
                problem_count=len(problems),
                samples=len(samples),
            )
            if problems:
                metrics.skipped.labels(project).inc(len(problems))
                log.warning(
                    "project %s: %d problems in the training data, e.g. %s", project, len(problems), problems[0]
                )
            if not samples:
                raise ValueError("no usable annotated task: nothing to train on")
            config = TrainConfig(
                minutes=settings.train_minutes, device=str(self.service.device), val_fraction=settings.val_fraction
            )
            info = train(
                samples,
                labels,
                self.project_dir,
                config,
                progress=self._on_progress,
                should_stop=self.runtime.stopping.is_set,
                extra_training={"project": project, "problem_count": len(problems)},
            )
            model = load_version(info.path, self.service.device)  # written and promoted: now serve it
            with self.state.lock:
                self.state.model = model
            self.model_version = info.version
            metrics.val_dice.labels(project).set(info.metrics["val_mean_dice"])
            self._report(
                state="idle",
                model_version=info.version,
                finished=time.time(),
                val_dice=info.metrics["val_dice"],
                val_iou=info.metrics["val_iou"],
            )
            metrics.runs.labels(project, "ok").inc()
            log.info(
                "project %s: version %s trained on %d tasks, val mean Dice %.3f",
                project,
                info.version,
                len(samples),
                info.metrics["val_mean_dice"],
            )
        except Exception as error:  # the served model stays; the failure is reported, not raised
            message = error.message if isinstance(error, BackendError) else f"{type(error).__name__}: {error}"
            log.error(
                "project %s: training failed: %s",
                project,
                message,
                exc_info=not isinstance(error, (BackendError, ValueError)),
            )
            self._report(state="failed", error=_short(message), finished=time.time())
            metrics.runs.labels(project, "failed").inc()
        finally:
            stack.close()
            metrics.active.labels(project).set(0)

    def _training_samples(self, labels: tuple[str, ...], store: SampleStore):
        """(samples, problems) from the project's annotated tasks; each decoded image and mask goes
        to `store` (disk) at once, so memory holds one image whatever the number of tasks."""
        config = self.parsed_label_config
        image_name = config.required_primary_image()
        output_names = [tag.name for tag in config.output_tags(image_name)]
        label_map = {label: index for index, label in enumerate(labels, start=1)}
        tasks = self._labelled_tasks()
        return samples_from_tasks(
            tasks,
            config.images[image_name],
            output_names,
            label_map,
            lambda uri, task_id: self.runtime.images.load(uri, task_id).pixels,
            store=store,
            max_polygon_vertices=self.runtime.settings.polygon_max_vertices,
        )

    def _labelled_tasks(self) -> list[dict]:
        """The project's annotated tasks through Label Studio's export API (JSON, annotations inline)."""
        return self.runtime.label_studio.get_json(
            f"/api/projects/{self.project_id}/export", {"exportType": "JSON", "download_all_tasks": "false"}
        )

    def _on_progress(self, progress: Progress) -> None:
        project = self.project_id or "default"
        self.service.metrics.epoch.labels(project).set(progress.epoch)
        self.service.metrics.loss.labels(project).set(progress.loss)
        update: dict[str, Any] = {
            "epoch": progress.epoch,
            "step": progress.step,
            "loss": round(progress.loss, 4),
            "elapsed_s": round(progress.elapsed_s, 1),
            "budget_s": progress.budget_s,
        }
        if progress.best_val_score is not None:
            update["best_val_dice"] = round(progress.best_val_score, 4)
        if progress.val_score is not None:
            update["val_dice"] = round(progress.val_score, 4)
        self._report(**update)

    def _report(self, **fields: Any) -> None:
        """Update the project's TrainingStatus (field names as in TrainingStatus)."""
        with self.state.lock:
            self.state.training = self.state.training.updated(**fields)


def _short(message: Any) -> str:
    """A message cut to MAX_REPORTED_CHARS for /health (problems quote URIs, which can be long)."""
    text = str(message)
    return text if len(text) <= MAX_REPORTED_CHARS else text[: MAX_REPORTED_CHARS - 3] + "..."


def mask_runs(mask: np.ndarray) -> int:
    """Runs of equal pixels in an HxW bool mask read row-major, as brush RLE encodes it."""
    flat = mask.ravel()
    return 1 + int(np.count_nonzero(flat[1:] != flat[:-1])) if flat.size else 0
