"""The interactive Segment Anything backend (port 9090), as Label Studio sees it.

- startup: load the engine once per process (SAM_ENGINE: auto | sam | classic | module:Class) and
  an embedding cache shared by every project.
- predict without context (Label Studio opens a task): PREWARM. Start computing the image's
  embedding in the background and answer at once, so the first click costs what later ones do.
- predict with context (a smart rectangle / keypoints): the embedding from the cache, one prompt
  per rectangle (points refine it), one brush region per prompt, plus polygons when the config
  has a PolygonLabels tag for that image.
- fit("TASKS_CREATED"): prewarm the new tasks' images; other events are ignored.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar

from backends.errors import BadRequest
from backends.label_config import BRUSH_TYPES, POLYGON_TYPES, ControlTag, LabelConfig
from backends.model_base import BackendContext, LabelStudioMLBase, ModelResponse
from backends.protocol import image_uri_of
from backends.regions import brush_region, polygon_regions
from sam.embeddings import EmbeddingStore
from sam.engines import load_engine
from sam.prompts import context_regions, prompts_from_context

log = logging.getLogger(__name__)

PREWARM_MAX_TASKS = 16  # per TASKS_CREATED webhook: the first tasks annotators will open


class SamBackend(LabelStudioMLBase):
    store: ClassVar[EmbeddingStore]

    @classmethod
    def startup(cls, context: BackendContext) -> None:
        cls.store = EmbeddingStore(load_engine(context.settings), context)
        log.info("SAM backend ready: %s", cls.store.health())

    def setup(self) -> None:
        self.model_version = self.store.engine.name

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> ModelResponse:
        if not context:
            for task in tasks:
                self.context.background.submit(self._prewarm, task)
            return ModelResponse(model_version=self.model_version, predictions=[])
        return ModelResponse(
            model_version=self.model_version,
            predictions=[self._segment(task, context) for task in tasks],
        )

    def fit(self, event: str, data: dict, **kwargs: Any) -> dict | None:
        if event != "TASKS_CREATED":
            return None
        tasks = data.get("tasks") or []
        for task in tasks[:PREWARM_MAX_TASKS]:
            self._prewarm(task)
        return {"prewarmed": min(len(tasks), PREWARM_MAX_TASKS)}

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

    def _prewarm(self, task: dict) -> None:
        """Compute (or find) the embedding of every image of the task; failures are logged, not raised."""
        try:
            config = self.parsed_label_config
            for to_name in _output_images(config):
                self.store.get(image_uri_of(task, config.images[to_name]), task.get("id"))
        except Exception as error:  # a background job: nobody waits for its answer
            task_id = task.get("id") if isinstance(task, dict) else None  # webhook tasks are unchecked
            log.warning("prewarm of task %s failed: %s", task_id, getattr(error, "message", error))


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
