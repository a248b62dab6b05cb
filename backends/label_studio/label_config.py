"""Label Studio label config (XML) -> the tags a segmentation backend cares about.

What is read:
- `<Image name="image" value="$image"/>`: the image tag and the task data key it shows.
- Control tags (anything with `name` and `toName`): output tags (BrushLabels, PolygonLabels, and
  the unlabelled Brush / Polygon tools, which take their labels from a Labels tag on the same
  image), prompt tags (RectangleLabels, KeyPointLabels, Rectangle, KeyPoint), and the rest kept
  as-is. `toName` may list several image names separated by commas.
- Labels are the `value` of `<Label>` children (not `alias`), in document order, deduplicated.
- `smart="true"` or `smartOnly="true"` marks a tag as a smart (interactive) tool.
Tag names are matched case-insensitively and reported in Label Studio's canonical spelling.

A config comes from any client (/setup, /predict, webhooks), so parsing is bounded: at most
`max_kb` KiB (LABEL_CONFIG_MAX_KB) checked before parsing, at most `max_depth` nested tags
(LABEL_CONFIG_MAX_DEPTH) checked while parsing, and one linear pass over the tags (a `<Label>`
belongs to its nearest enclosing control tag; no per-tag walk of its subtree).
"""

from __future__ import annotations

import functools
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import dataclass, field

from backends.errors import BadRequest

BRUSH_TYPES = ("BrushLabels", "Brush")
POLYGON_TYPES = ("PolygonLabels", "Polygon")
PROMPT_TYPES = ("RectangleLabels", "KeyPointLabels", "Rectangle", "KeyPoint")
_CANONICAL = {
    name.lower(): name
    for name in (
        *BRUSH_TYPES,
        *POLYGON_TYPES,
        *PROMPT_TYPES,
        "Labels",
        "Image",
        "Label",
        "Choices",
        "TextArea",
        "Taxonomy",
        "Ellipse",
        "EllipseLabels",
        "Magicwand",
    )
}
_TRUE = {"true", "1", "yes"}
DEFAULT_MAX_KB = 256.0
DEFAULT_MAX_DEPTH = 64
_FEED_CHARS = 64 * 1024  # fed to the parser at a time, so a too-deep config stops early
# Labels that unlabelled tools inherit, all tools together: many tools times many Labels tags would
# otherwise grow quadratically within the size cap (3000 x 2400 in 256 KiB took 4 s).
MAX_INHERITED_LABELS = 100_000


class LabelConfigError(BadRequest):
    """The label config is malformed or lacks what the backend needs."""


@dataclass(frozen=True)
class ControlTag:
    """A control tag: `name`, canonical `type` ("BrushLabels", ...), the Image it labels.

    `to_name` is the first image name of `toName`; `to_names` all of them.
    """

    name: str
    type: str
    to_name: str
    labels: tuple[str, ...]
    smart: bool
    to_names: tuple[str, ...] = ()
    smart_only: bool = False
    # For an unlabelled tool (Brush, Polygon, ...): (label, name of the Labels tag it comes from).
    label_sources: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.to_names:
            object.__setattr__(self, "to_names", (self.to_name,))

    def targets(self, to_name: str) -> bool:
        return to_name in self.to_names

    def labels_tag(self, label: str) -> str | None:
        """The Labels tag `label` comes from, for an unlabelled tool; None for a *Labels tag."""
        return next((source for name, source in self.label_sources if name == label), None)


@dataclass(frozen=True)
class LabelConfig:
    """The parsed config: `images` maps Image tag name -> task data key (without the '$')."""

    images: Mapping[str, str]
    controls: tuple[ControlTag, ...]

    def output_images(self) -> tuple[str, ...]:
        """Names of the Image tags a brush or polygon tag draws on, in document order."""
        return self._output_images

    @functools.cached_property
    def _output_images(self) -> tuple[str, ...]:
        drawn_on = {name for tag in self._output_tags for name in tag.to_names}
        return tuple(name for name in self.images if name in drawn_on)

    def primary_image(self) -> str | None:
        """The first output image (see `output_images`): the one a whole-task prediction segments."""
        return next(iter(self._output_images), None)

    def required_primary_image(self) -> str:
        """`primary_image()`, or BadRequest when no Image tag has a brush or polygon output."""
        image = self.primary_image()
        if image is None:
            raise BadRequest("the label config has no Image tag with a brush or polygon output")
        return image

    def output_tags(self, image: str, label: str | None = None) -> tuple[ControlTag, ...]:
        """Brush and polygon tags drawing on Image `image` (only those with `label`, when given),
        in document order: the tags a mask of that image is read from and written to."""
        return tuple(tag for tag in self._output_tags if tag.targets(image) and (label is None or label in tag.labels))

    @functools.cached_property
    def _output_tags(self) -> tuple[ControlTag, ...]:
        """Brush and polygon tags on any Image, in document order."""
        return tuple(
            tag
            for tag in self.controls
            if tag.type in BRUSH_TYPES + POLYGON_TYPES and any(name in self.images for name in tag.to_names)
        )

    def output_labels(self) -> tuple[str, ...]:
        """Ordered union of the brush and polygon tags' labels: the segmentation label map order.

        Index 0 is background in a class-index mask, so label k (0-based here) is class k + 1.
        """
        return self._output_labels

    @functools.cached_property
    def _output_labels(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for tag in self._output_tags:
            seen.update(dict.fromkeys(tag.labels))
        return tuple(seen)


def parse_label_config(xml: str, max_kb: float = DEFAULT_MAX_KB, max_depth: int = DEFAULT_MAX_DEPTH) -> LabelConfig:
    """Parse a label config XML string in one pass over its tags.

    Raises LabelConfigError when it is empty, over `max_kb` KiB (UTF-8), nests tags more than
    `max_depth` deep, declares a DTD, or is not well-formed XML.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the label config is empty")
    _check_size(xml, max_kb)
    # The stdlib parser expands internal entities: refuse DTDs outright (no billion laughs).
    if re.search(r"<!\s*(DOCTYPE|ENTITY)", xml, flags=re.IGNORECASE):
        raise LabelConfigError("the label config must not contain a DOCTYPE or ENTITY declaration")
    reader = _TagReader(max_depth)
    parser: ElementTree.XMLPullParser[ElementTree.Element] = ElementTree.XMLPullParser(events=("start", "end"))
    try:
        for offset in range(0, len(xml), _FEED_CHARS):
            parser.feed(xml[offset : offset + _FEED_CHARS])
            reader.read(parser.read_events())
        parser.close()
        reader.read(parser.read_events())
    except ElementTree.ParseError as exc:
        raise LabelConfigError(f"the label config is not well-formed XML: {exc}") from None
    except UnicodeError:  # the parser encodes the text first: a lone surrogate ("\\ud800") cannot be
        raise LabelConfigError("the label config is not valid Unicode text (it holds a lone surrogate)") from None
    controls = [draft.tag() for draft in reader.controls]
    return LabelConfig(images=reader.images, controls=tuple(_inherit_labels(controls)))


def _check_size(xml: str, max_kb: float) -> None:
    limit = int(max_kb * 1024)
    if len(xml) > limit or len(xml.encode("utf-8", "surrogatepass")) > limit:
        size = len(xml.encode("utf-8", "surrogatepass"))
        raise LabelConfigError(
            f"the label config is {size / 1024:.0f} KiB; at most {max_kb:g} KiB is accepted (LABEL_CONFIG_MAX_KB)"
        )


@dataclass
class _ControlDraft:
    """A control tag while its `<Label>` children are being read."""

    name: str
    type: str
    to_names: tuple[str, ...]
    smart: bool
    smart_only: bool
    labels: dict[str, None] = field(default_factory=dict)

    def tag(self) -> ControlTag:
        return ControlTag(
            name=self.name,
            type=self.type,
            to_name=self.to_names[0],
            labels=tuple(self.labels),
            smart=self.smart,
            to_names=self.to_names,
            smart_only=self.smart_only,
        )


class _TagReader:
    """Consumes the parser's start/end events: Image tags, control tags and their labels.

    Every tag is looked at once, when it opens (its attributes are known then); a `<Label>` goes to
    the innermost open control tag. Depth is counted as tags open, so a config nested deeper than
    `max_depth` is refused before the rest of it is even parsed.
    """

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.images: dict[str, str] = {}
        self.controls: list[_ControlDraft] = []
        self._open: list[_ControlDraft | None] = []  # per open tag: the control it is, or None
        self._open_controls: list[_ControlDraft] = []

    def read(self, events) -> None:
        for event, element in events:
            if event == "start":
                self._start(element)
            else:
                if self._open.pop() is not None:
                    self._open_controls.pop()
                element.clear()  # read already: keep the tree from holding every attribute

    def _start(self, element: ElementTree.Element) -> None:
        if len(self._open) >= self.max_depth:
            raise LabelConfigError(
                f"the label config nests tags more than {self.max_depth} deep (LABEL_CONFIG_MAX_DEPTH)"
            )
        kind = _CANONICAL.get(str(element.tag).lower(), str(element.tag))
        control = None
        if kind == "Label":
            value = element.get("value")
            if value is not None and self._open_controls:
                self._open_controls[-1].labels[value] = None
        elif kind == "Image":
            name, value = element.get("name"), element.get("value") or element.get("valueList") or ""
            if name and value.startswith("$"):
                self.images[name] = value[1:]
        else:
            control = self._control(kind, element)
        self._open.append(control)
        if control is not None:
            self._open_controls.append(control)
            self.controls.append(control)

    @staticmethod
    def _control(kind: str, element: ElementTree.Element) -> _ControlDraft | None:
        name = element.get("name")
        to_names = tuple(part.strip() for part in (element.get("toName") or "").split(",") if part.strip())
        if not name or not to_names:
            return None
        smart_only = (element.get("smartOnly") or "").lower() in _TRUE
        smart = smart_only or (element.get("smart") or "").lower() in _TRUE
        return _ControlDraft(name, kind, to_names, smart, smart_only)


def _inherit_labels(controls: list[ControlTag]) -> list[ControlTag]:
    """Unlabelled Brush/Polygon/Rectangle/KeyPoint tools take the labels of a Labels tag on the same image.

    Labels tags are indexed by image name once, and each distinct `toName` list is resolved once;
    LabelConfigError when more than MAX_INHERITED_LABELS labels would be inherited in all.
    """
    shared = [tag for tag in controls if tag.type == "Labels"]
    by_image: dict[str, list[int]] = {}
    for index, tag in enumerate(shared):
        for name in tag.to_names:
            by_image.setdefault(name, []).append(index)
    resolved: dict[tuple[str, ...], dict[str, str]] = {}  # toName list -> {label: its Labels tag}
    result = []
    inherited_total = 0
    for tag in controls:
        if tag.type in ("Brush", "Polygon", "Rectangle", "KeyPoint") and not tag.labels:
            if tag.to_names not in resolved:
                indexes = sorted({i for name in tag.to_names for i in by_image.get(name, ())})
                inherited: dict[str, str] = {}
                for index in indexes:  # in document order, as Label Studio lists them; the first tag wins
                    for label in shared[index].labels:
                        inherited.setdefault(label, shared[index].name)
                resolved[tag.to_names] = inherited
            sources = resolved[tag.to_names]
            inherited_total += len(sources)
            if inherited_total > MAX_INHERITED_LABELS:
                raise LabelConfigError(
                    f"the label config's unlabelled tools would inherit more than {MAX_INHERITED_LABELS} labels "
                    "from Labels tags in all: give the tools their own labels or share fewer Labels tags"
                )
            tag = ControlTag(
                tag.name,
                tag.type,
                tag.to_name,
                tuple(sources),
                tag.smart,
                tag.to_names,
                tag.smart_only,
                tuple(sources.items()),
            )
        result.append(tag)
    return result


def require_segmentation_output(config: LabelConfig) -> None:
    """LabelConfigError unless a BrushLabels/PolygonLabels (or Brush/Polygon) tag with labels
    draws on an Image tag of the config, and every such tag draws on Image tags only (a brush on
    a Text tag cannot be served)."""
    if not config.images:
        raise LabelConfigError("the label config has no <Image> tag with a $variable value")
    for tag in config.controls:
        strays = [name for name in tag.to_names if name not in config.images]
        if tag.type in BRUSH_TYPES + POLYGON_TYPES and strays:
            raise LabelConfigError(
                f"the {tag.type} tag '{tag.name}' has toName '{', '.join(strays)}', which is not an <Image> "
                f"tag with a $variable value (images: {', '.join(config.images)})"
            )
    tags = config._output_tags
    if not tags:
        raise LabelConfigError(
            "the label config has no BrushLabels or PolygonLabels tag bound to an <Image> "
            f"(images: {', '.join(config.images)})"
        )
    if not any(tag.labels for tag in tags):
        raise LabelConfigError(f"the output tag '{tags[0].name}' has no <Label value=...> children")
