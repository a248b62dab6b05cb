"""Which of a pretrained model's classes become which project label (SEG_LABEL_MAP). Pure.

`"Upper-clothes=Top,Pants=Trousers"`: model class name = project label, names compared without
regard to case; several model classes may feed one label ("Left-shoe=Shoe,Right-shoe=Shoe").
With a map, the model classes it does not name are background. Without one, each model class
keeps its own name, and a project label gets the class whose name matches it (case-insensitive);
classes named like background never become a label.
"""

from __future__ import annotations

from collections.abc import Mapping

from segmentation.hf_network import BACKGROUND_NAMES

MAX_ENTRIES = 1000


def parse_label_map(text: str) -> dict[str, str]:
    """ "A=B, C=D" -> {"a": "B", "c": "D"} (model class names lower-cased). ValueError when an
    entry is not `class=label` or names one class twice."""
    label_map: dict[str, str] = {}
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"SEG_LABEL_MAP has {len(entries)} entries, more than {MAX_ENTRIES}")
    for entry in entries:
        model_class, separator, label = (part.strip() for part in entry.partition("="))
        if not separator or not model_class or not label:
            raise ValueError(f"SEG_LABEL_MAP entry {entry!r} is not model_class=project_label")
        if model_class.lower() in label_map:
            raise ValueError(f"SEG_LABEL_MAP names the model class {model_class!r} twice")
        label_map[model_class.lower()] = label
    return label_map


def merge_classes(id2label: Mapping[int, str], label_map: Mapping[str, str]) -> tuple[tuple[str, ...], list[int]]:
    """(labels, target) for a model with classes 0..N-1 named by `id2label`.

    target[i] is where model class i goes: 0 background, k the k-th of `labels` (labels in the
    order their first class appears). `label_map` as `parse_label_map` returns it; empty: names kept.
    """
    labels: list[str] = []
    target: list[int] = []
    for index in range(len(id2label)):
        name = str(id2label.get(index, f"class{index}"))
        label = label_map.get(name.lower()) if label_map else (None if name.lower() in BACKGROUND_NAMES else name)
        if label is None:
            target.append(0)
            continue
        if label not in labels:
            labels.append(label)
        target.append(labels.index(label) + 1)
    return tuple(labels), target


def match_label(model_label: str, project_labels: Mapping[str, str]) -> str | None:
    """The project's label for a model's label: exact, else the same name in another case.
    `project_labels`: {label.lower(): label}."""
    return project_labels.get(model_label.lower())
