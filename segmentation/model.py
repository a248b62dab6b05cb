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
  With REDIS_URL the run is an RQ job instead (segmentation/job_queue.py), run by
  `python -m segmentation.worker` processes; /health shows the status they publish in Redis.
- Serving: each project's `current` version is looked at every SEG_VERSION_POLL_S, so a version
  promoted by another process (a worker, the offline CLI) is served without a restart.
- The server keeps MAX_PROJECTS projects; the service's `forget_project` drops an evicted project's
  state, /health entry and metric series (a queued or training project is never evicted).

Versions of project P live in MODEL_DIR/project-P/ (see segmentation/versions.py).
"""

from __future__ import annotations

import logging
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
from segmentation.data import SampleStore
from segmentation.job_queue import STALE_WRITE_S, TrainingJobs
from segmentation.label_map import match_label
from segmentation.postprocess import Cleaning, clean_segmentation
from segmentation.service import (
    UNTRAINED,
    ProjectState,
    SegmentationService,
    TrainingStatus,
    remove_interrupted_runs,
)
from segmentation.tiled_inference import segment_images
from segmentation.trainer import Progress
from segmentation.training_run import (
    collect_samples,
    labelled_tasks,
    progress_fields,
    project_label_config,
    run_training,
)
from segmentation.versions import LOAD_ERRORS, LoadedModel, VersionInfo, current_version, load_version

log = logging.getLogger(__name__)

# Upper bound of brush RLE bytes per run of a mask (a token is at most 1 + 2 + 16 + 8 bits).
RLE_BYTES_PER_RUN = 27 / 8


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
        settings = runtime.settings
        jobs = TrainingJobs.from_settings(settings) if settings.redis_url else None  # runs go to RQ workers
        # Before the fallback model is looked up. A MODEL_DIR shared with workers may hold a version
        # being written right now: only old leftovers are removed then.
        remove_interrupted_runs(Path(settings.model_dir), older_than_s=STALE_WRITE_S if jobs else 0.0)
        return SegmentationService(settings, runtime.metrics, training_jobs=jobs)

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
        """The project's current version, else the fallback model, else None. `current` is looked
        at again at most every SEG_VERSION_POLL_S: a version another process promoted (an RQ worker,
        the offline CLI) is served within that time, without a restart."""
        state = self.state
        with state.lock:
            self._pick_up_current(state)
            served = state.model or self.service.fallback
        # a version served for the first time refreshes the unlabeled tasks' predictions (refresh.py)
        self.service.refresher.served(self, served.info.version if served else None)
        return served

    def _pick_up_current(self, state: ProjectState) -> None:
        """Under the state's lock: load the project's current version if it changed since the last
        look (at most one look per SEG_VERSION_POLL_S: a read of `current` and a stat). A version
        that cannot be loaded is logged once and the model served so far stays."""
        now = time.monotonic()
        if now - state.version_checked < self.runtime.settings.seg_version_poll_s:
            return
        state.version_checked = now
        name = current_version(self.project_dir)
        if name is None or name == state.loaded_version:
            return
        state.loaded_version = name
        try:
            state.model = load_version(self.project_dir / name, self.service.device)
        except LOAD_ERRORS as error:  # keep serving what was served
            log.error("project %s: cannot load version %s: %s", self.project_id, name, error)
        else:
            self.model_version = name
            log.info("project %s: serving version %s", self.project_id, name)

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
                        model.network,
                        [image.pixels],
                        model.device,
                        size_multiple=model.info.network.size_multiple,
                        normalization=model.info.network.normalization,
                    )
                segmentation = clean_segmentation(segmentation, Cleaning.from_settings(self.runtime.settings))
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

        The model's classes are matched to the config by label name (a pretrained model's class
        names without regard to case): labels the project no longer has are dropped; labels it
        added are predicted once a model is trained with them. A label
        whose mask is so fragmented that the task's brush RLE would pass SEG_MAX_RLE_MB (estimated
        from its runs before encoding) is left out: Label Studio cannot use such an answer.
        """
        config = self.parsed_label_config
        budget = self.runtime.settings.seg_max_rle_mb * 2**20
        regions: list[dict] = []
        notes: list[str] = []
        project_labels = {label.lower(): label for label in config.output_labels()}
        for index, score in sorted(segmentation.class_confidence.items()):
            label = model_labels[index - 1]
            label = label if config.output_tags(image_name, label) else match_label(label, project_labels) or label
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
        later annotation tries again). With REDIS_URL the count is shared by the replicas and the
        run is an RQ job (Overloaded, a 503, while Redis does not answer)."""
        state = self.state
        project = self.project_id or ""
        jobs = self.service.training_jobs
        with state.lock:
            if event != "START_TRAINING":
                state.new_annotations = jobs.count_annotation(project) if jobs else state.new_annotations + 1
                if state.new_annotations < self.runtime.settings.train_every:
                    return {
                        "training": "waiting",
                        "new_annotations": state.new_annotations,
                        "train_every": self.runtime.settings.train_every,
                    }
            outcome = self._queue_training(event)
            if outcome == "queued":
                state.new_annotations = 0
                if jobs:
                    jobs.reset_annotations(project)
                state.training = TrainingStatus(state="queued", reason=event, queued=time.time())
        answer: dict[str, Any] = {"training": outcome}
        position = jobs.position(project) if jobs else self.service.training_queue.position(project)
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
        jobs = self.service.training_jobs
        if jobs is not None:  # an RQ worker runs it: python -m segmentation.worker
            return jobs.submit(self.project_id or "", self.label_config, event)
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
        """The training thread: annotations -> samples -> new version -> served (segmentation/training_run.py)."""
        project = self.project_id or "default"
        metrics = self.service.metrics
        metrics.active.labels(project).set(1)
        try:
            outcome = run_training(
                project,
                self._output_labels,
                self.project_dir,
                self.runtime.settings,
                self.service.device,
                collect=self._training_samples,
                report=self._report,
                on_progress=self._on_progress,
                should_stop=self.runtime.stopping.is_set,
                serve=self._serve,
            )
        finally:
            metrics.active.labels(project).set(0)
        if outcome.problem_count:
            metrics.skipped.labels(project).inc(outcome.problem_count)
        if outcome.version is None:
            metrics.runs.labels(project, "failed").inc()
            return
        metrics.val_dice.labels(project).set(outcome.version.metrics["val_mean_dice"])
        metrics.runs.labels(project, "ok").inc()

    def _output_labels(self) -> tuple[str, ...]:
        """The labels a model of this project predicts (asks Label Studio for the config when a
        webhook arrived before any /setup)."""
        if not self.label_config:
            self.use_label_config(project_label_config(self.runtime.label_studio, self.project_id or ""))
        return self.parsed_label_config.output_labels()

    def _serve(self, info: VersionInfo) -> None:
        """A run promoted `info`: serve it now rather than at the next version check."""
        model = load_version(info.path, self.service.device)
        with self.state.lock:
            self.state.model = model
            self.state.loaded_version = info.version
        self.model_version = info.version

    def _training_samples(self, labels: tuple[str, ...], store: SampleStore):
        """(samples, problems) from the project's annotated tasks, decoded into `store` (disk)."""
        return collect_samples(
            self.parsed_label_config,
            self._labelled_tasks(),
            labels,
            lambda uri, task_id: self.runtime.images.load(uri, task_id).pixels,
            store,
            max_polygon_vertices=self.runtime.settings.polygon_max_vertices,
        )

    def _labelled_tasks(self) -> list[dict]:
        """The project's annotated tasks through Label Studio's export API (JSON, annotations inline)."""
        return labelled_tasks(self.runtime.label_studio, self.project_id or "")

    def _on_progress(self, progress: Progress) -> None:
        project = self.project_id or "default"
        self.service.metrics.epoch.labels(project).set(progress.epoch)
        self.service.metrics.loss.labels(project).set(progress.loss)
        self.state.history.add(progress.step, progress.loss, progress.elapsed_s, progress.val_score)  # status page
        self._report(**progress_fields(progress))

    def _report(self, **fields: Any) -> None:
        """Update the project's TrainingStatus (field names as in TrainingStatus)."""
        with self.state.lock:
            self.state.training = self.state.training.updated(**fields)


def mask_runs(mask: np.ndarray) -> int:
    """Runs of equal pixels in an HxW bool mask read row-major, as brush RLE encodes it."""
    flat = mask.ravel()
    return 1 + int(np.count_nonzero(flat[1:] != flat[:-1])) if flat.size else 0
