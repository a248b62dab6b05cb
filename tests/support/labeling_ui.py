"""Driving Label Studio 1.23's labeling view with Playwright, for tests/browser.

The editor exposes its store as `window.Htx` (the annotation being edited is
`Htx.annotationStore.selected`); the helpers read regions from it rather than from pixels, and
wait on it (`wait_for_function`) rather than sleeping: on 2 cores the data manager takes ~10 s and
a task 8-12 s to open. Image coordinates are pixels of the original image; the Konva stage shows
the whole image at the default zoom, so they scale linearly to the displayed image's box.
"""

from __future__ import annotations

import json
from typing import Any

LOAD_TIMEOUT_MS = 90_000
ANSWER_TIMEOUT_MS = 30_000

# Regions of the edited annotation: id, kind, whether it is a smart prompt, labels, RLE length/sum.
_AREAS_JS = """() => Array.from(window.Htx.annotationStore.selected.areas.values()).map(r => ({
  id: r.id, type: r.type, dynamic: !!r.dynamic, hidden: !!r.hidden,
  labels: r.results.flatMap(x => (x.value && x.value.labels) || []),
  results: r.results.map(x => x.type),
  rle: r.rle ? Array.from(r.rle) : null,
}))"""


def log_in(page: Any, url: str, email: str, password: str) -> None:
    page.goto(f"{url}/user/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda address: "/user/login" not in address, timeout=LOAD_TIMEOUT_MS)


def open_task(page: Any, url: str, project_id: int, task_id: int) -> None:
    """Open the task in the labeling view and wait until the editor and its image are ready."""
    page.goto(f"{url}/projects/{project_id}/data?task={task_id}")
    page.wait_for_function(
        "() => window.Htx && window.Htx.annotationStore && window.Htx.annotationStore.selected",
        timeout=LOAD_TIMEOUT_MS,
    )
    page.locator(".konvajs-content").first.wait_for(timeout=LOAD_TIMEOUT_MS)
    page.wait_for_function(
        "() => { const image = Array.from(window.Htx.annotationStore.selected.names.values())"
        ".find(t => t.type === 'image'); return !!(image && image.currentImageEntity && image.currentImageEntity.imageLoaded) }",
        timeout=LOAD_TIMEOUT_MS,
    )


AUTO_ANNOTATION = "bottombar-auto-annotation-toggle"
AUTO_ACCEPT = "bottombar-auto-accept-toggle"


def switch_on(page: Any, toggle: str) -> None:
    """Switch on a toggle of the bottom bar (AUTO_ANNOTATION, AUTO_ACCEPT)."""
    box = page.locator(f"input[data-testid={toggle}]")
    box.wait_for(state="attached")
    if not box.is_checked():
        box.check(force=True)
    flag = "autoAnnotation" if toggle == AUTO_ANNOTATION else "autoAcceptSuggestions"
    page.wait_for_function(f"() => window.Htx.{flag} === true")


def choose_smart_tool(page: Any, aria_label: str) -> None:
    """Select a tool of the Auto-Detect group ("rectangle-tool", "key-point-tool")."""
    page.locator(f".lsf-toolbar .lsf-tool_smart[aria-label={aria_label}]").first.dispatch_event("click")
    page.wait_for_function(
        "(name) => Array.from(document.querySelectorAll('.lsf-toolbar .lsf-tool_active'))"
        ".some(e => e.getAttribute('aria-label') === name)",
        arg=aria_label,
    )


def choose_label(page: Any, label: str) -> None:
    """Click a label in the label bar and wait until it is the chosen one."""
    page.locator(".lsf-label", has=page.locator(".lsf-label__text", has_text=label)).first.click()
    page.wait_for_function(
        "(label) => Array.from(window.Htx.annotationStore.selected.names.values())"
        ".some(t => t.selectedLabels && t.selectedLabels.some(l => l.value === label))",
        arg=label,
    )


def toolbar(page: Any) -> list[str]:
    """The toolbar's tools in order, smart ones prefixed with "smart:"."""
    return page.evaluate(
        "() => Array.from(document.querySelectorAll('.lsf-toolbar .lsf-tool')).filter(e => e.getAttribute('aria-label'))"
        ".map(e => (e.classList.contains('lsf-tool_smart') ? 'smart:' : '') + e.getAttribute('aria-label'))"
    )


def label_bar(page: Any) -> list[str]:
    """The labels listed under the image, as shown (name only), once the bar is drawn."""
    page.locator(".lsf-label__text").first.wait_for()
    return page.evaluate("() => Array.from(document.querySelectorAll('.lsf-label__text')).map(e => e.innerText.trim())")


def areas(page: Any) -> list[dict]:
    return page.evaluate(_AREAS_JS)


def serialized_results(page: Any) -> list[dict]:
    """The annotation's results as the editor would submit them (RLEs left out)."""
    return json.loads(
        page.evaluate(
            "() => JSON.stringify(window.Htx.annotationStore.selected.serializeAnnotation()"
            ".map(r => ({...r, value: Object.fromEntries(Object.entries(r.value).filter(([k]) => k !== 'rle'))})))"
        )
    )


def wait_for_regions(page: Any, kind: str, count: int, timeout: int = ANSWER_TIMEOUT_MS) -> list[dict]:
    """Wait until the annotation holds exactly `count` regions of `kind` ("brushregion") and no
    smart prompt is left; returns the regions."""
    page.wait_for_function(
        "([kind, count]) => { const all = Array.from(window.Htx.annotationStore.selected.areas.values());"
        " return all.filter(r => r.type === kind).length === count && !all.some(r => r.dynamic) }",
        arg=[kind, count],
        timeout=timeout,
    )
    return [area for area in areas(page) if area["type"] == kind]


class Stage:
    """The image on screen: maps original-image pixels to page coordinates (the displayed <img>
    the Image tag keeps as `imageRef`; it may be larger than the Konva stage's box)."""

    def __init__(self, page: Any, width: int, height: int):
        self.page = page
        self.width, self.height = width, height
        self.box = page.evaluate(
            "() => { const image = Array.from(window.Htx.annotationStore.selected.names.values())"
            ".find(t => t.type === 'image'); const r = image.imageRef.getBoundingClientRect();"
            " return {x: r.x, y: r.y, width: r.width, height: r.height} }"
        )

    def point(self, x: float, y: float) -> tuple[float, float]:
        return (
            self.box["x"] + x / self.width * self.box["width"],
            self.box["y"] + y / self.height * self.box["height"],
        )

    def drag(self, x0: float, y0: float, x1: float, y1: float) -> None:
        start, end = self.point(x0, y0), self.point(x1, y1)
        mouse = self.page.mouse
        mouse.move(*start)
        mouse.down()
        mouse.move((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, steps=3)
        mouse.move(*end, steps=3)
        mouse.up()

    def click(self, x: float, y: float, modifier: str | None = None) -> None:
        if modifier:
            self.page.keyboard.down(modifier)
        try:
            self.page.mouse.click(*self.point(x, y))
        finally:
            if modifier:
                self.page.keyboard.up(modifier)
