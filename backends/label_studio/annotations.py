"""Which of a task's annotations is its ground truth (training, mask export): the newest usable one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def newest_annotation(annotations: Any) -> dict | None:
    """The newest annotation that was not cancelled (skipped) and has a `result` list, by
    updated_at, then created_at, then id; None when there is none (or `annotations` is no list)."""
    if not isinstance(annotations, list):
        return None
    usable: list[Mapping[str, Any]] = [
        a
        for a in annotations
        if isinstance(a, Mapping) and not a.get("was_cancelled") and isinstance(a.get("result"), list)
    ]
    if not usable:
        return None
    newest = max(usable, key=_annotation_order)
    return dict(newest)


def _annotation_order(annotation: Mapping[str, Any]) -> tuple[str, int]:
    """Sort key: newest by updated_at, then created_at, then id (ids that are not numbers sort first)."""
    stamp = str(annotation.get("updated_at") or annotation.get("created_at") or "")
    number = annotation.get("id")
    return stamp, number if isinstance(number, int) and not isinstance(number, bool) else 0
