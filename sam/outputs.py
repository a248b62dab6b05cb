"""Which output tag a prompt's mask becomes: one kind of region per prompt (SAM_OUTPUT).

A config with both BrushLabels and PolygonLabels used to get two regions per prompt (8 nuclei
became 16 regions). `auto` (default) answers with a brush region when a brush tag has the label,
else a polygon; `brush` / `polygon` prefer that kind (falling back to the other when the config
has only it); `both` answers with one region of each kind the config has.
"""

from __future__ import annotations

from typing import TypeVar

OUTPUT_MODES = ("auto", "brush", "polygon", "both")
Tag = TypeVar("Tag")


def choose_outputs(brush: Tag | None, polygon: Tag | None, mode: str) -> list[Tag]:
    """The tags to answer with, given the brush and polygon tags that have the prompt's label."""
    if mode not in OUTPUT_MODES:
        raise ValueError(f"SAM_OUTPUT={mode!r}: expected one of {', '.join(OUTPUT_MODES)}")
    available = [tag for tag in (brush, polygon) if tag is not None]
    if mode == "both" or len(available) < 2:
        return available
    return [polygon] if mode == "polygon" else [brush]  # type: ignore[list-item]
