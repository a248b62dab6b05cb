"""Text (concept) prompts for SAM 3: which phrase to look for, and which label its instances get.

Interactive: a smart `TextArea` in the label config sends its text in the context
(`{"type": "textarea", "value": {"text": ["nucleus"]}, "to_name": "image", ...}`); every instance
of that concept becomes one region, labelled with the label whose name (or synonym) matches the
text, or the only output label when there is one.
Pre-annotation (SAM_TEXT_PROMPTS=labels): each output label is looked for under its own name and
its synonyms (SAM_TEXT_SYNONYMS="Nucleus=nucleus|cell nucleus;Top=shirt|blouse").
Pure functions; no model here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backends.errors import BadRequest

TEXTAREA = "textarea"
MAX_TEXT_CHARS = 200


@dataclass(frozen=True)
class TextPrompt:
    """A concept to find: `text` (stripped, at most MAX_TEXT_CHARS) on the Image tag `to_name`."""

    text: str
    to_name: str


def text_prompts(regions: Sequence[Mapping[str, Any]]) -> list[TextPrompt]:
    """The text prompts among the context's regions (already shape-checked), in order."""
    found = []
    for index, region in enumerate(regions):
        if region.get("type") != TEXTAREA:
            continue
        texts = region["value"].get("text")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest(f"context region {index}: a text prompt needs value.text, a list of strings")
        text = " ".join(t.strip() for t in texts).strip()
        if not text:
            raise BadRequest(f"context region {index}: the text prompt is empty; type what to segment")
        if len(text) > MAX_TEXT_CHARS:
            raise BadRequest(f"context region {index}: the text prompt is longer than {MAX_TEXT_CHARS} characters")
        found.append(TextPrompt(text, str(region.get("to_name") or "")))
    return found


def parse_synonyms(setting: str) -> dict[str, tuple[str, ...]]:
    """SAM_TEXT_SYNONYMS "Label=phrase|phrase;Label2=phrase" -> {label: (phrases...)}."""
    synonyms: dict[str, tuple[str, ...]] = {}
    for entry in (setting or "").split(";"):
        if not entry.strip():
            continue
        label, separator, phrases = entry.partition("=")
        if not separator or not label.strip():
            raise ValueError(f"SAM_TEXT_SYNONYMS entry {entry.strip()!r} is not Label=phrase|phrase")
        words = tuple(p.strip() for p in phrases.split("|") if p.strip())
        if not words:
            raise ValueError(f"SAM_TEXT_SYNONYMS entry {entry.strip()!r} names no phrase")
        synonyms[label.strip()] = words
    return synonyms


def phrases_for(label: str, synonyms: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """What to look for to find `label`: its synonyms when configured, else its own name."""
    return tuple(synonyms.get(label) or (label,))


def label_for_text(text: str, labels: Sequence[str], synonyms: Mapping[str, Sequence[str]]) -> str:
    """The output label the instances of `text` get (case-insensitive name or synonym match, else
    the only label). BadRequest when the text names none of several labels."""
    wanted = text.casefold()
    for label in labels:
        if wanted == label.casefold() or wanted in (p.casefold() for p in synonyms.get(label, ())):
            return label
    if len(labels) == 1:
        return labels[0]
    raise BadRequest(
        f"the text prompt {text!r} names none of the labels ({', '.join(labels)}): type a label's name "
        "(or one of its SAM_TEXT_SYNONYMS)"
    )
