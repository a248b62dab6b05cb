"""One training run of a project: annotations -> samples -> a new version, promoted.

Both ways of running training call `run_training`: the in-process queue of the serving backend
(segmentation/model.py, REDIS_URL unset) and the RQ worker (segmentation/worker.py, REDIS_URL set).
The caller says where the run's samples come from (`collect`), where its progress goes (`report`,
TrainingStatus field names, and `on_progress`) and what to do once the version is promoted
(`serve`); the run itself reads nothing from the environment and keeps no state.

The new version is written and made current atomically by segmentation/versions.py: a run killed
at any moment leaves the previous version served (and an `.incomplete-*` folder to remove).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backends.errors import BackendError
from backends.label_studio.client import LabelStudioClient
from backends.label_studio.label_config import LabelConfig
from backends.settings import Settings
from segmentation.data import AnySample, SampleStore, samples_from_tasks
from segmentation.service import TRAINING_SAMPLES_PREFIX
from segmentation.trainer import Progress, train, training_config
from segmentation.versions import VersionInfo

log = logging.getLogger(__name__)

MAX_REPORTED_PROBLEMS = 10
MAX_REPORTED_CHARS = 200  # per problem or error message in /health

#: (labels, store) -> (samples, problems): the run's annotated tasks as training samples.
CollectSamples = Callable[[tuple[str, ...], SampleStore], tuple[Sequence[AnySample], list[str]]]


@dataclass(frozen=True)
class RunOutcome:
    """What a run ended with: the promoted version, or None when it failed (already reported)."""

    version: VersionInfo | None
    samples: int = 0
    problem_count: int = 0


def short(message: Any) -> str:
    """A message cut to MAX_REPORTED_CHARS for /health (problems quote URIs, which can be long)."""
    text = str(message)
    return text if len(text) <= MAX_REPORTED_CHARS else text[: MAX_REPORTED_CHARS - 3] + "..."


def labelled_tasks(label_studio: LabelStudioClient, project_id: str) -> list[dict]:
    """The project's annotated tasks through Label Studio's export API (JSON, annotations inline)."""
    return label_studio.get_json(
        f"/api/projects/{project_id}/export", {"exportType": "JSON", "download_all_tasks": "false"}
    )


def project_label_config(label_studio: LabelStudioClient, project_id: str) -> str:
    """The project's label config as Label Studio has it (for a run that has none yet)."""
    project = label_studio.get_json(f"/api/projects/{project_id}")
    config = project.get("label_config") if isinstance(project, dict) else None
    if not isinstance(config, str) or not config:
        raise ValueError(f"Label Studio gave no label config for project {project_id}")
    return config


def collect_samples(
    config: LabelConfig,
    tasks: Sequence[dict],
    labels: tuple[str, ...],
    load_pixels: Callable[[str, int | None], np.ndarray],
    store: SampleStore,
    max_polygon_vertices: int,
) -> tuple[list[AnySample], list[str]]:
    """(samples, problems) from annotated `tasks`; each decoded image and mask goes to `store`
    (disk) at once, so memory holds one image whatever the number of tasks. `load_pixels(uri,
    task_id)` gives HxWx3 uint8 pixels."""
    image_name = config.required_primary_image()
    output_names = [tag.name for tag in config.output_tags(image_name)]
    label_map = {label: index for index, label in enumerate(labels, start=1)}
    return samples_from_tasks(
        tasks,
        config.images[image_name],
        output_names,
        label_map,
        load_pixels,
        store=store,
        max_polygon_vertices=max_polygon_vertices,
    )


def run_training(
    project: str,
    labels_of: Callable[[], tuple[str, ...]],
    project_dir: Path,
    settings: Settings,
    device: str,
    collect: CollectSamples,
    report: Callable[..., None],
    on_progress: Callable[[Progress], None],
    should_stop: Callable[[], bool] | None = None,
    serve: Callable[[VersionInfo], None] | None = None,
    samples_parent: Path | None = None,
) -> RunOutcome:
    """Train `project` on what `collect` gives for the labels `labels_of()` names (the project's
    label config, which may have to be fetched) and promote the new version in `project_dir`; the
    trainer's configuration comes from `settings` (trainer.training_config) and `device`.

    Reports as it goes: samples and problems, progress, then `state="idle"` with the new version
    and its validation scores (after `serve` ran), or `state="failed"` with the error. Never raises:
    the served model stays whatever goes wrong. Decoded samples live in a temporary folder under
    `samples_parent` (default: `project_dir`), removed when the run ends.
    """
    samples_count = problem_count = 0
    with contextlib.ExitStack() as stack:  # removes the run's decoded samples, whatever happens
        try:
            labels = labels_of()
            project_dir.mkdir(parents=True, exist_ok=True)
            parent = samples_parent or project_dir
            parent.mkdir(parents=True, exist_ok=True)
            # A run stopped mid-write (server stopping, folder removed under it) must not fail its
            # cleanup: what is left is removed at the next start (remove_interrupted_runs).
            samples_dir = stack.enter_context(
                tempfile.TemporaryDirectory(prefix=TRAINING_SAMPLES_PREFIX, dir=parent, ignore_cleanup_errors=True)
            )
            samples, problems = collect(labels, SampleStore(Path(samples_dir)))
            samples_count, problem_count = len(samples), len(problems)
            report(
                problems=[short(problem) for problem in problems[:MAX_REPORTED_PROBLEMS]],
                problem_count=problem_count,
                samples=samples_count,
            )
            if problems:
                log.warning(
                    "project %s: %d problems in the training data, e.g. %s", project, problem_count, problems[0]
                )
            if not samples:
                raise ValueError("no usable annotated task: nothing to train on")
            info = train(
                samples,
                labels,
                project_dir,
                training_config(settings, str(device), project_dir),  # SEG_MODEL, TRAIN_MINUTES, ...
                progress=on_progress,
                should_stop=should_stop,
                extra_training={"project": project, "problem_count": problem_count},
            )
            if serve is not None:
                serve(info)
            report(
                state="idle",
                model_version=info.version,
                finished=time.time(),
                val_dice=info.metrics["val_dice"],
                val_iou=info.metrics["val_iou"],
            )
            log.info(
                "project %s: version %s trained on %d tasks, val mean Dice %.3f",
                project,
                info.version,
                samples_count,
                info.metrics["val_mean_dice"],
            )
            return RunOutcome(info, samples_count, problem_count)
        except Exception as error:  # the served model stays; the failure is reported, not raised
            message = error.message if isinstance(error, BackendError) else f"{type(error).__name__}: {error}"
            log.error(
                "project %s: training failed: %s",
                project,
                message,
                exc_info=not isinstance(error, (BackendError, ValueError)),
            )
            report(state="failed", error=short(message), finished=time.time())
            return RunOutcome(None, samples_count, problem_count)


def progress_fields(progress: Progress) -> dict[str, Any]:
    """A trainer progress report as TrainingStatus fields (rounded for /health)."""
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
    return update
