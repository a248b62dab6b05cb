"""The interactive Segment Anything backend (port 9090), as Label Studio sees it.

- startup: load the engine once per process (SAM_ENGINE: auto | sam | classic | module:Class) and
  an embedding cache shared by every project.
- predict without context (Label Studio opens a task): PREWARM. Start computing the image's
  embedding in the background and answer at once, so the first click costs what later ones do.
- predict with context (a smart rectangle / keypoints): the embedding from the cache, one prompt
  per rectangle (points refine it), one brush region per prompt, plus polygons when the config
  has a PolygonLabels tag for that image.
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
from typing import Any, ClassVar

from backends.errors import BackendError, BadRequest, TooManyRequests
from backends.label_studio.label_config import BRUSH_TYPES, POLYGON_TYPES, ControlTag, LabelConfig
from backends.server.model_base import BackendContext, LabelStudioMLBase, ModelResponse
from backends.server.protocol import image_uri_of
from backends.label_studio.regions import brush_region, polygon_regions
from backends.server.work_queue import QueueFull
from sam.embeddings import EmbeddingStore
from sam.engines import load_engine
from sam.prompts import check_prompt_count, context_regions, prompts_from_context

log = logging.getLogger(__name__)

ImageRef = tuple[str, Any]  # (image URI, task id): all a prewarm keeps of a task


class SamBackend(LabelStudioMLBase):
    FIT_IN_REQUEST = True  # fit only queues bounded prewarms: the webhook can answer 429 when full
    store: ClassVar[EmbeddingStore]
    _prewarming: ClassVar[dict[str, int]]  # project id -> prewarm jobs queued or running
    _prewarm_lock: ClassVar[threading.Lock]

    @classmethod
    def startup(cls, context: BackendContext) -> None:
        cls.store = EmbeddingStore(load_engine(context.settings), context)
        cls._prewarming = {}
        cls._prewarm_lock = threading.Lock()
        log.info("SAM backend ready: %s", cls.store.health())

    def setup(self) -> None:
        self.model_version = self.store.engine.name

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> ModelResponse:
        if not context:
            self._start_prewarm(tasks, refuse_when_full=False)
            return ModelResponse(model_version=self.model_version, predictions=[])
        check_prompt_count(context, len(tasks), self.context.settings.max_prompts_per_request)
        return ModelResponse(
            model_version=self.model_version,
            predictions=[self._segment(task, context) for task in tasks],
        )

    def fit(self, event: str, data: dict, **kwargs: Any) -> dict | None:
        if event != "TASKS_CREATED":
            return None
        tasks = data.get("tasks")
        return {"prewarm": self._start_prewarm(tasks if isinstance(tasks, list) else [], refuse_when_full=True)}

    @classmethod
    def health(cls) -> dict:
        return cls.store.health()

    @classmethod
    def versions(cls) -> list:
        return [cls.store.engine.name]

    # -- the interactive call -----------------------------------------------------------------

    def _segment(self, task: dict, context: dict) -> dict:
        config = self.parsed_label_config
        to_name = _prompted_image(context_regions(context), config)
        record = self.store.get(image_uri_of(task, config.images[to_name]), task.get("id"))
        prompts = prompts_from_context(context, record.width, record.height, config.output_labels())
        regions, scores = [], []
        for prompt in prompts:
            mask, score = self.store.predict(record, prompt.box, prompt.points, prompt.point_labels)
            for tag in _output_tags(config, to_name, prompt.label):
                if tag.type in BRUSH_TYPES:
                    regions.append(brush_region(mask, prompt.label, tag, record.width, record.height, score, to_name=to_name))
                else:
                    regions += polygon_regions(mask, prompt.label, tag, record.width, record.height, score, to_name=to_name)
            scores.append(score)
        return {
            "result": regions,
            "score": sum(scores) / len(scores) if scores else 0.0,
            "model_version": self.model_version,
        }

    # -- prewarming ------------------------------------------------------------------------------

    def _start_prewarm(self, tasks: list, refuse_when_full: bool) -> dict:
        """Queue the embeddings of the first PREWARM_MAX_PER_REQUEST tasks' images; returns
        {"queued": tasks queued, "not_prewarmed": the rest}. A project's prewarms queued or running
        are capped by the same number. A full background queue raises TooManyRequests when
        `refuse_when_full` (a webhook), else the rest are skipped (Label Studio opening a task)."""
        limit = self.context.settings.prewarm_max_per_request
        queued = 0
        for task in tasks[:limit]:
            refs = self._image_refs(task)
            if not refs or not self._take_prewarm_slot(limit):
                continue
            try:
                self.context.background.submit(self._prewarm, refs)
            except QueueFull as full:
                self._release_prewarm_slot()
                if refuse_when_full and queued == 0:
                    raise TooManyRequests(
                        f"too much background work: {full.running} jobs running and {full.waiting} waiting "
                        f"(BACKGROUND_QUEUE_MAX={self.context.settings.background_queue_max}); no task of this "
                        "event was prewarmed, their embeddings are computed at the first click"
                    ) from None
                break
            queued += 1
        if len(tasks) > queued:
            log.debug("project %s: %d of %d tasks not prewarmed (PREWARM_MAX_PER_REQUEST=%d)",
                      self.project_id, len(tasks) - queued, len(tasks), limit)
        return {"queued": queued, "not_prewarmed": len(tasks) - queued}

    def _image_refs(self, task: Any) -> list[ImageRef]:
        """(URI, task id) of each image of the task the config segments; [] when unusable (logged)."""
        try:
            config = self.parsed_label_config
            return [(image_uri_of(task, config.images[name]), task.get("id")) for name in _output_images(config)]
        except BackendError as error:
            task_id = task.get("id") if isinstance(task, dict) else None  # webhook tasks are unchecked
            log.warning("task %s not prewarmed: %s", task_id, error.message)
            return []

    def _take_prewarm_slot(self, limit: int) -> bool:
        project = self.project_id or ""
        with self._prewarm_lock:
            if self._prewarming.get(project, 0) >= limit:
                return False
            self._prewarming[project] = self._prewarming.get(project, 0) + 1
            return True

    def _release_prewarm_slot(self) -> None:
        project = self.project_id or ""
        with self._prewarm_lock:
            left = self._prewarming.get(project, 0) - 1
            if left > 0:
                self._prewarming[project] = left
            else:  # no entry for an idle project: the map stays as small as the work in flight
                self._prewarming.pop(project, None)

    def _prewarm(self, refs: list[ImageRef]) -> None:
        """Compute (or find) the embedding of each image; failures are logged, not raised."""
        try:
            for uri, task_id in refs:
                self.store.get(uri, task_id, interactive=False)
        except Exception as error:  # a background job: nobody waits for its answer
            log.warning("prewarm of task %s failed: %s", refs[0][1], getattr(error, "message", error))
        finally:
            self._release_prewarm_slot()


# -- label config lookups -------------------------------------------------------------------------


def _output_images(config: LabelConfig) -> list[str]:
    """Image tags that have a brush or polygon output tag."""
    return [name for name in config.images if any(tag.targets(name) for tag in config.output_tags())]


def _prompted_image(regions: list[dict], config: LabelConfig) -> str:
    """The Image tag the smart tool was used on (the regions' to_name), else the first output image.
    `regions`: the context's regions, shape already checked by `context_regions`."""
    names = {region.get("to_name") for region in regions} - {None}
    if len(names) > 1:
        raise BadRequest(f"interactive prompts on several images at once ({', '.join(sorted(names))})")
    images = _output_images(config)
    name = names.pop() if names else (images[0] if images else None)
    if name not in config.images:
        raise BadRequest(f"the label config has no Image tag named {name!r}")
    return name


def _output_tags(config: LabelConfig, to_name: str, label: str) -> list[ControlTag]:
    """The first brush tag and the first polygon tag on Image `to_name` that have `label`."""
    found: list[ControlTag] = []
    for types in (BRUSH_TYPES, POLYGON_TYPES):
        tag = next(
            (t for t in config.output_tags() if t.type in types and t.targets(to_name) and label in t.labels),
            None,
        )
        if tag is not None:
            found.append(tag)
    if not found:
        raise BadRequest(f"no BrushLabels or PolygonLabels tag on image {to_name!r} has the label {label!r}")
    return found
