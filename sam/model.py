"""The interactive Segment Anything backend (port 9090), as Label Studio sees it.

- startup: load the engine once per process (SAM_ENGINE: auto | sam | classic | module:Class) and
  an embedding cache shared by every project; they live in the `SamService` it returns, which the
  server hands to every project's instance (`self.service`).
- predict without context (Label Studio opens a task): PREWARM. Start computing the image's
  embedding in the background and answer at once, so the first click costs what later ones do.
- predict with context (a smart rectangle / keypoints / a smart TextArea): the embedding from the
  cache, one prompt per rectangle (points refine it; an added click reuses the region's previous
  logits), one region per prompt in the kind SAM_OUTPUT chooses (brush by default); a text prompt
  (SAM 3) gives one region per instance of its concept. Label Studio sends a click without the box
  it corrects: clicks inside the box of a region answered on that image refine that region under
  its id, which the editor replaces in place (sam.last_regions); a negative click anywhere else
  gets no region, so the editor removes it (with Auto-Accept on).
- SAM_TEXT_PROMPTS=labels: predict without context answers with every instance of every label,
  found by concept prompts with the label names (pre-annotation before any training).
- fit("TASKS_CREATED"): prewarm the new tasks' images; other events are ignored. It runs inside
  the webhook request (FIT_IN_REQUEST) and only queues (image URI, task id) pairs, never the body.

Bounds (a client can send any number of tasks and prompts): a request starts at most
PREWARM_MAX_PER_REQUEST prewarms, a project has at most that many queued or running at once, and
all of them wait in the bounded background queue (BACKGROUND_QUEUE_MAX); tasks beyond are just
not prewarmed (their first click computes the embedding), so prewarming never evicts more than
a bounded share of the embedding cache. An interactive request holds at most
MAX_PROMPTS_PER_REQUEST prompts (context regions x tasks).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from backends.errors import BackendError, BadRequest, TooManyRequests
from backends.label_studio.label_config import BRUSH_TYPES
from backends.label_studio.regions import mask_regions
from backends.server.model_base import BackendRuntime, BackendService, LabelStudioMLBase, ModelResponse
from backends.server.protocol import image_uri_of
from backends.server.work_queue import QueueFull
from sam.embeddings import EmbeddingStore
from sam.engines import load_engine
from sam.last_regions import LastRegions
from sam.outputs import choose_outputs
from sam.prompts import PromptContext, parse_context
from sam.text_prompts import label_for_text, parse_synonyms, phrases_for

log = logging.getLogger(__name__)

ImageRef = tuple[str, Any]  # (image URI, task id): all a prewarm keeps of a task


class SamService(BackendService):
    """What every SAM project shares for the life of the process: the engine with its embedding
    store, how many prewarm jobs each project has queued or running, and SAM_TEXT_SYNONYMS parsed
    ({label: phrases})."""

    def __init__(self, store: EmbeddingStore, synonyms: dict[str, tuple[str, ...]] | None = None):
        super().__init__()
        self.store = store
        self.synonyms = synonyms or {}
        self.last_regions = LastRegions(shared=store.shared)  # so a later click can correct an answered region
        self._prewarming: dict[str, int] = {}  # project id -> prewarm jobs queued or running
        self._prewarm_lock = threading.Lock()

    def health(self) -> dict:
        return self.store.health()

    def versions(self) -> list:
        return [self.store.engine.name]

    def take_prewarm_slot(self, project: str, limit: int) -> bool:
        """Count one more prewarm job for `project`, unless it already has `limit`."""
        with self._prewarm_lock:
            if self._prewarming.get(project, 0) >= limit:
                return False
            self._prewarming[project] = self._prewarming.get(project, 0) + 1
            return True

    def release_prewarm_slot(self, project: str) -> None:
        with self._prewarm_lock:
            left = self._prewarming.get(project, 0) - 1
            if left > 0:
                self._prewarming[project] = left
            else:  # no entry for an idle project: the map stays as small as the work in flight
                self._prewarming.pop(project, None)


class SamBackend(LabelStudioMLBase):
    FIT_IN_REQUEST = True  # fit only queues bounded prewarms: the webhook can answer 429 when full
    runtime: BackendRuntime
    service: SamService

    @classmethod
    def startup(cls, runtime: BackendRuntime) -> SamService:
        settings = runtime.settings
        choose_outputs(None, None, settings.sam_output)  # refuse a bad SAM_OUTPUT at start
        if settings.sam_text_prompts not in ("", "off", "labels"):
            raise ValueError(f"SAM_TEXT_PROMPTS={settings.sam_text_prompts!r}: expected labels or off")
        synonyms = parse_synonyms(settings.sam_text_synonyms)  # once, and a bad value refuses to start
        service = SamService(EmbeddingStore(load_engine(settings), settings, runtime.images, runtime.metrics), synonyms)
        log.info("SAM backend ready: %s", service.health())
        return service

    @property
    def store(self) -> EmbeddingStore:
        """The engine and embedding cache every project shares."""
        return self.service.store

    def setup(self) -> None:
        self.model_version = self.store.engine.name

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> ModelResponse:
        if not context and self.runtime.settings.sam_text_prompts == "labels":
            return ModelResponse(model_version=self.model_version, predictions=self._find_every_label(tasks))
        if not context:
            self._start_prewarm(tasks, refuse_when_full=False)
            return ModelResponse(model_version=self.model_version, predictions=[])
        prompts = parse_context(
            context, self.parsed_label_config, len(tasks), self.runtime.settings.max_prompts_per_request
        )
        return ModelResponse(
            model_version=self.model_version,
            predictions=[self._segment(task, prompts) for task in tasks],
        )

    def fit(self, event: str, data: dict, **kwargs: Any) -> dict | None:
        if event != "TASKS_CREATED":
            return None
        tasks = data.get("tasks")
        return {"prewarm": self._start_prewarm(tasks if isinstance(tasks, list) else [], refuse_when_full=True)}

    # -- the interactive call -----------------------------------------------------------------

    def _segment(self, task: dict, prompts: PromptContext) -> dict:
        config = self.parsed_label_config
        image = prompts.image
        record = self.store.get(image_uri_of(task, config.images[image]), task.get("id"))
        regions, scores = [], []
        for prompt in prompts.prompts(record.width, record.height, keep_negative_only=True):
            region_id = None
            earlier = self.service.last_regions.refinement(record.identity, prompt)
            if earlier is not None:  # clicks inside an answered region: correct it in place
                prompt, region_id = earlier.prompt, earlier.region_id
            elif not any(prompt.point_labels) and prompt.box is None:
                log.info(
                    "task %s: a negative click outside every region answered on this image describes no "
                    "object; answered with no region (Label Studio then removes the click)",
                    task.get("id"),
                )
                continue
            mask, score = self.store.predict(record, prompt)
            answer = self._regions(mask, prompt.label, image, score, region_id)
            if answer:
                self.service.last_regions.remember(record.identity, prompt, answer[0]["id"])
            regions += answer
            scores.append(score)
        labels = [label for tag in config.output_tags(image) for label in tag.labels]
        for text in prompts.texts:
            label = label_for_text(text.text, list(dict.fromkeys(labels)), self.service.synonyms)
            for mask, score in self._instances(record, text.text):
                regions += self._regions(mask, label, image, score)
                scores.append(score)
        return {
            "result": regions,
            "score": sum(scores) / len(scores) if scores else 0.0,
            "model_version": self.model_version,
        }

    def _regions(self, mask: Any, label: str, image: str, score: float, region_id: str | None = None) -> list[dict]:
        """One mask -> its result regions, in the kind SAM_OUTPUT chooses among the tags with `label`
        (`region_id`: the id of the first, to replace an earlier answer in place)."""
        tags = self.parsed_label_config.output_tags(image, label)
        brush = next((tag for tag in tags if tag.type in BRUSH_TYPES), None)
        polygon = next((tag for tag in tags if tag.type not in BRUSH_TYPES), None)
        regions: list[dict] = []
        for tag in choose_outputs(brush, polygon, self.runtime.settings.sam_output):
            regions += mask_regions(
                mask,
                label,
                tag,
                score,
                to_name=image,
                tolerance=self.runtime.settings.sam_polygon_tolerance,
                first_id=region_id if not regions else None,
            )
        return regions

    def _instances(self, record: Any, text: str) -> list:
        settings = self.runtime.settings
        return self.store.segment_text(record, text, settings.sam_text_threshold, settings.sam_text_max_instances)

    # -- pre-annotation by text prompts (SAM_TEXT_PROMPTS=labels) ----------------------------------

    def _find_every_label(self, tasks: list[dict]) -> list[dict]:
        """Every instance of every output label in each task's image, found by concept prompts with
        the label names (or SAM_TEXT_SYNONYMS): pre-annotation on day one, before any training."""
        limit = self.runtime.settings.prewarm_max_per_request
        if len(tasks) > limit:
            raise BadRequest(
                f"{len(tasks)} tasks in one request; text-prompt pre-annotation takes at most {limit} "
                "(PREWARM_MAX_PER_REQUEST): retrieve predictions for fewer tasks at a time"
            )
        config = self.parsed_label_config
        image = config.required_primary_image()
        labels = list(dict.fromkeys(label for tag in config.output_tags(image) for label in tag.labels))
        predictions = []
        for task in tasks:
            record = self.store.get(image_uri_of(task, config.images[image]), task.get("id"))
            regions, scores = [], []
            for label in labels:
                for phrase in phrases_for(label, self.service.synonyms):
                    for mask, score in self._instances(record, phrase):
                        regions += self._regions(mask, label, image, score)
                        scores.append(score)
            predictions.append(
                {
                    "result": regions,
                    "score": sum(scores) / len(scores) if scores else 0.0,
                    "model_version": self.model_version,
                }
            )
        return predictions

    # -- prewarming ------------------------------------------------------------------------------

    def _start_prewarm(self, tasks: list, refuse_when_full: bool) -> dict:
        """Queue the embeddings of the first PREWARM_MAX_PER_REQUEST tasks' images; returns
        {"queued": tasks queued, "not_prewarmed": the rest}. A project's prewarms queued or running
        are capped by the same number. A full background queue raises TooManyRequests when
        `refuse_when_full` (a webhook), else the rest are skipped (Label Studio opening a task)."""
        limit = self.runtime.settings.prewarm_max_per_request
        queued = 0
        for task in tasks[:limit]:
            refs = self._image_refs(task)
            if not refs or not self.service.take_prewarm_slot(self.project_id or "", limit):
                continue
            try:
                self.runtime.background.submit(self._prewarm, refs)
            except QueueFull as full:
                self.service.release_prewarm_slot(self.project_id or "")
                if refuse_when_full and queued == 0:
                    raise TooManyRequests(
                        f"too much background work: {full.running} jobs running and {full.waiting} waiting "
                        f"(BACKGROUND_QUEUE_MAX={self.runtime.settings.background_queue_max}); no task of this "
                        "event was prewarmed, their embeddings are computed at the first click"
                    ) from None
                break
            queued += 1
        if len(tasks) > queued:
            log.debug(
                "project %s: %d of %d tasks not prewarmed (PREWARM_MAX_PER_REQUEST=%d)",
                self.project_id,
                len(tasks) - queued,
                len(tasks),
                limit,
            )
        return {"queued": queued, "not_prewarmed": len(tasks) - queued}

    def _image_refs(self, task: Any) -> list[ImageRef]:
        """(URI, task id) of each image of the task the config segments; [] when unusable (logged)."""
        try:
            config = self.parsed_label_config
            return [(image_uri_of(task, config.images[name]), task.get("id")) for name in config.output_images()]
        except BackendError as error:
            task_id = task.get("id") if isinstance(task, dict) else None  # webhook tasks are unchecked
            log.warning("task %s not prewarmed: %s", task_id, error.message)
            return []

    def _prewarm(self, refs: list[ImageRef]) -> None:
        """Compute (or find) the embedding of each image; failures are logged, not raised."""
        try:
            for uri, task_id in refs:
                self.store.get(uri, task_id, interactive=False)
        except Exception as error:  # a background job: nobody waits for its answer
            log.warning("prewarm of task %s failed: %s", refs[0][1], getattr(error, "message", error))
        finally:
            self.service.release_prewarm_slot(self.project_id or "")
