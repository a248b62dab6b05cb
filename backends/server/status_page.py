"""The status page a person opens in a browser (`GET /` with Accept: text/html), and its JSON.

`status_report(server)` gathers what the page shows, as JSON-like data (GET /status.json, which the
page polls every 2 s): the service's health (engine or model, device, queue), each project's
training run with its plotted history, cache use and hit rates, and the recent warnings and errors.
`render_status_page(report, ...)` turns it into plain HTML, adding the model versions and the limits
in force, which do not change while a page is open. Everything shown is escaped (`html.escape`):
label names, project fields and error messages come from Label Studio, tasks and requests; health
and error messages are redacted before they get here (no token or password is shown).

The plots are drawn in the browser by uPlot (MIT, vendored in static/ with its license, no CDN:
the page works offline) from the history in /status.json; static/status.js does the polling.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.settings import Settings

if TYPE_CHECKING:
    from backends.metrics import Metrics
    from backends.server.app import BackendServer

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The only files /static/ serves (read once at start): nothing else on disk is reachable.
STATIC_TYPES = {
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "status.js": "text/javascript; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
    "NOTICE": "text/plain; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
}
POLL_INTERVAL_MS = 2000
MAX_SHOWN_VERSIONS = 50
MAX_SHOWN_LABELS = 20  # per version's metrics and per project's validation Dice
CACHE_METRICS = {  # Prometheus sample name -> field, for every cache labelled `cache="<name>"`
    "cache_bytes": "bytes",
    "cache_entries": "entries",
    "cache_capacity_bytes": "capacity_bytes",
    "cache_hits_total": "hits",
    "cache_misses_total": "misses",
    "cache_evictions_total": "evictions",
}


class StaticAssets:
    """The page's scripts and styles, read into memory once; `get(name)` -> (bytes, media type) or None."""

    def __init__(self, directory: Path = STATIC_DIR):
        self._files = {name: ((directory / name).read_bytes(), kind) for name, kind in STATIC_TYPES.items()}

    def get(self, name: str) -> tuple[bytes, str] | None:
        return self._files.get(name)


# -- the data --------------------------------------------------------------------------------


def status_report(server: BackendServer) -> dict[str, Any]:
    """What /status.json answers: {backend, status, generated, health, training, caches, errors}.

    `training` maps each project to its training fields (as in /health) plus `history`
    (`{"loss": [[step, loss, elapsed_s], ...], "val_dice": [[step, dice, elapsed_s], ...]}`);
    it is null for a backend that does not train. `health` is /health without its projects.
    """
    health = server.health()  # redacted
    projects = health.pop("projects", None)
    training: dict[str, dict] | None = None
    if isinstance(projects, dict):
        history = server.service.training_history()
        training = {
            str(project): {**fields, "history": history.get(str(project), {"loss": [], "val_dice": []})}
            for project, fields in projects.items()
        }
    return {
        "backend": server.model_class.__name__,
        "status": health.get("status", "UP"),
        "generated": time.time(),
        "health": health,
        "training": training,
        "caches": cache_use(server.runtime.metrics, getattr(server.runtime.images, "cache", None)),
        "errors": server.recent_errors.entries(),
    }


def cache_use(metrics: Metrics, image_cache: Any = None) -> list[dict[str, Any]]:
    """Every cache that reports `cache_*` metrics (the SAM embedding cache), plus the image disk
    cache when there is one: name, bytes, entries, capacity, hits, misses, hit rate (None before
    the first lookup)."""
    caches: dict[str, dict[str, Any]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            field = CACHE_METRICS.get(sample.name)
            name = sample.labels.get("cache")
            if field and name:
                caches.setdefault(name, {"name": name})[field] = sample.value
    if image_cache is not None and getattr(image_cache, "enabled", False):
        caches["images (disk)"] = {
            "name": "images (disk)",
            "bytes": image_cache.total_bytes,
            "entries": len(image_cache),
            "capacity_bytes": image_cache.capacity_bytes,
            "hits": image_cache.hits,
            "misses": image_cache.misses,
            "evictions": image_cache.evictions,
        }
    for cache in caches.values():
        lookups = cache.get("hits", 0) + cache.get("misses", 0)
        cache["hit_rate"] = cache.get("hits", 0) / lookups if lookups else None
    return list(caches.values())


# The limits in force: (group, variable, value from Settings, what it bounds). Groups named in
# BACKEND_GROUPS are shown only on that backend's page.
LIMITS: tuple[tuple[str, str, Callable[[Settings], Any], str], ...] = (
    ("Requests", "MAX_REQUEST_MB", lambda s: s.max_request_mb, "MiB per request body"),
    ("Requests", "MAX_PROJECTS", lambda s: s.max_projects, "projects kept in memory"),
    ("Requests", "BACKGROUND_QUEUE_MAX", lambda s: s.background_queue_max, "background jobs waiting"),
    ("Requests", "LABEL_CONFIG_MAX_KB", lambda s: s.label_config_max_kb, "KiB per label config"),
    ("Requests", "LABEL_CONFIG_MAX_DEPTH", lambda s: s.label_config_max_depth, "nesting of a label config"),
    ("Images", "IMAGE_MAX_MB", lambda s: s.image_max_bytes / 2**20, "MiB per image file"),
    ("Images", "IMAGE_MAX_MEGAPIXELS", lambda s: s.image_max_pixels / 1e6, "megapixels per image"),
    ("Images", "IMAGE_FETCH_TIMEOUT", lambda s: s.image_fetch_timeout_s, "s per connect or read"),
    ("Images", "IMAGE_FETCH_DEADLINE", lambda s: s.fetch_deadline_s, "s per fetch, retries included"),
    ("Images", "IMAGE_FETCH_RETRIES", lambda s: s.image_fetch_retries, "retries per fetch"),
    ("Images", "IMAGE_FETCH_PER_HOST", lambda s: s.image_fetch_per_host, "fetches in flight per host"),
    ("Images", "IMAGE_FETCH_QUEUE_WAIT", lambda s: s.image_fetch_queue_wait_s, "s waiting for a host's slot"),
    ("Images", "IMAGE_MAX_JPEG_SCANS", lambda s: s.image_max_jpeg_scans, "scans per JPEG"),
    ("Images", "DECODE_MAX_INFLIGHT_MEGAPIXELS", lambda s: s.decode_budget_pixels / 1e6, "decoded megapixels held"),
    ("Images", "DECODE_WAIT_TIMEOUT", lambda s: s.decode_wait_s, "s waiting for that budget"),
    ("Images", "DECODE_CONCURRENCY", lambda s: s.decode_concurrency, "images decoded at once"),
    ("Images", "IMAGE_CACHE_MB", lambda s: s.image_cache_mb, "MiB of the image disk cache"),
    ("SAM", "EMBEDDING_CACHE_MB", lambda s: s.embedding_cache_mb, "MiB of embeddings in memory"),
    ("SAM", "PREWARM_MAX_PER_REQUEST", lambda s: s.prewarm_max_per_request, "embeddings one request starts"),
    ("SAM", "MAX_PROMPTS_PER_REQUEST", lambda s: s.max_prompts_per_request, "prompts per /predict"),
    ("SAM", "SAM_TEXT_MAX_INSTANCES", lambda s: s.sam_text_max_instances, "instances per text prompt"),
    ("Training", "TRAIN_EVERY", lambda s: s.train_every, "new annotations that start a run"),
    ("Training", "TRAIN_MINUTES", lambda s: s.train_minutes, "min per run"),
    ("Training", "TRAIN_CONCURRENCY", lambda s: s.train_concurrency, "runs at once"),
    ("Training", "TRAIN_QUEUE_MAX", lambda s: s.train_queue_max, "runs waiting"),
    ("Training", "SEG_MAX_RLE_MB", lambda s: s.seg_max_rle_mb, "MiB of brush RLE per prediction"),
    ("Training", "POLYGON_MAX_VERTICES", lambda s: s.polygon_max_vertices, "vertices per polygon"),
)
BACKEND_GROUPS = {"SAM": "sam", "Training": "segmentation"}


def limits_in_force(settings: Settings, package: str) -> list[tuple[str, str, Any, str]]:
    """(group, variable, value, meaning) for the backend in `package` ("sam", "segmentation";
    any other package, e.g. a test model, gets every group)."""
    known = set(BACKEND_GROUPS.values())
    return [
        (group, name, value(settings), meaning)
        for group, name, value, meaning in LIMITS
        if package not in known or BACKEND_GROUPS.get(group, package) == package
    ]


# -- the page --------------------------------------------------------------------------------


def render_status_page(
    report: dict[str, Any], versions: list, limits: list[tuple[str, str, Any, str]], title: str
) -> str:
    """The whole page: a pure function of what it shows."""
    health = report["health"]
    summary = [
        ("status", report["status"]),
        ("engine / model", _served(health, versions)),
        ("device", health.get("device", "-")),
    ]
    sections = [
        _section("Service", _key_values(_flatten(health))),
        _section("Recent errors", _errors(report["errors"]), section_id="errors"),
        _section("Training", _training(report["training"]), wide=True),
        _section("Model versions", _versions(versions), wide=True),
        _section("Caches", _caches(report["caches"])),
        _section("Limits in force", _limits(limits)),
    ]
    badges = "".join(f'<span class="badge"><b>{_e(name)}</b> {_e(value)}</span>' for name, value in summary)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<link rel="stylesheet" href="static/uPlot.min.css">
<link rel="stylesheet" href="static/status.css">
</head>
<body data-poll-ms="{POLL_INTERVAL_MS}">
<header>
<h1>{_e(title)}</h1>
<div class="badges" id="summary" data-status="{_e(report["status"])}">{badges}</div>
<p class="updated">updated <span id="updated">{_e(_clock(report["generated"]))}</span>
<span id="connection"></span> &middot; JSON: <a href="health">/health</a>, <a href="status.json">/status.json</a>,
<a href="versions">/versions</a>, <a href="metrics">/metrics</a> &middot;
plots by uPlot (<a href="static/NOTICE">notice</a>, <a href="static/uPlot.LICENSE">MIT license</a>)</p>
</header>
<main>
{"".join(sections)}
</main>
{_run_template()}
<script src="static/uPlot.iife.min.js"></script>
<script src="static/status.js"></script>
</body>
</html>
"""


def _served(health: dict[str, Any], versions: list) -> str:
    """The engine (SAM), else the current versions (segmentation: one per project), else the model state."""
    if health.get("engine"):
        return str(health["engine"])
    current = [v for v in versions if isinstance(v, dict) and v.get("current")]
    if current:
        names = [f"{v.get('version')} (project {v.get('project') or 'default'})" for v in current[:3]]
        return ", ".join(names) + (f" and {len(current) - 3} more" if len(current) > 3 else "")
    return str(health.get("fallback_model") or health.get("model_state") or "-")


TRAINING_FIELDS = (
    "state",
    "reason",
    "epoch",
    "step",
    "loss",
    "val_dice",
    "best_val_dice",
    "elapsed_s",
    "budget_s",
    "samples",
    "problem_count",
    "model_version",
    "new_annotations",
    "error",
    "note",
)


def _training(training: dict[str, dict] | None) -> str:
    if training is None:
        return '<p class="empty">This backend does not train.</p>'
    runs = "".join(_run(project, fields) for project, fields in training.items())
    empty = "" if training else '<p class="empty" id="no-runs">No project has trained or asked to yet.</p>'
    return f'{empty}<div class="runs" id="runs">{runs}</div>'


def _run(project: str, fields: dict[str, Any]) -> str:
    rows = "".join(
        f'<dt>{_e(name)}</dt><dd data-field="{_e(name)}">{_e(_format(fields.get(name)))}</dd>'
        for name in TRAINING_FIELDS
    )
    problems = fields.get("problems") or []
    listed = "".join(f"<li>{_e(problem)}</li>" for problem in problems)
    return f"""<article class="run" data-project="{_e(project)}">
<h3>project <span class="project">{_e(project or "default")}</span>
<span class="state" data-state="{_e(fields.get("state", "idle"))}">{_e(fields.get("state", "idle"))}</span></h3>
<div class="plots"><figure><figcaption>training loss by step</figcaption><div class="plot" data-series="loss"></div></figure>
<figure><figcaption>validation Dice (mean) by step</figcaption><div class="plot" data-series="val_dice"></div></figure></div>
<dl>{rows}</dl>
<ul class="problems">{listed}</ul>
</article>"""


def _run_template() -> str:
    """An empty run card, which status.js copies for a project that starts training after load."""
    return f'<template id="run-template">{_run("", {})}</template>'


def _versions(versions: list) -> str:
    if not versions:
        return '<p class="empty">No model version yet.</p>'
    if not all(isinstance(version, dict) for version in versions):  # names only (SAM: its engine)
        return "<ul>" + "".join(f"<li>{_e(version)}</li>" for version in versions[:MAX_SHOWN_VERSIONS]) + "</ul>"
    newest = sorted(versions, key=lambda v: str(v.get("created") or ""), reverse=True)[:MAX_SHOWN_VERSIONS]
    rows = []
    for version in newest:
        dice, iou = version.get("val_dice"), version.get("val_iou")
        rows.append(
            "<tr>"
            f"<td>{_e(version.get('version'))}{' <b>(current)</b>' if version.get('current') else ''}</td>"
            f"<td>{_e(version.get('project') or '-')}</td>"
            f"<td>{_e(version.get('created') or '-')}</td>"
            f"<td>{_per_label(dice)}</td><td>{_per_label(iou)}</td>"
            "</tr>"
        )
    more = len(versions) - len(newest)
    note = f'<p class="empty">and {more} older versions (GET /versions lists them all)</p>' if more > 0 else ""
    return (
        "<table><thead><tr><th>version</th><th>project</th><th>created</th><th>val Dice</th><th>val IoU</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>{note}"
    )


def _per_label(scores: Any) -> str:
    if not isinstance(scores, dict):
        return _e(_format(scores))
    shown = list(scores.items())[:MAX_SHOWN_LABELS]
    return "<br>".join(f"{_e(label)} {_e(_format(score))}" for label, score in shown)


def _caches(caches: list[dict[str, Any]]) -> str:
    if not caches:
        return '<p class="empty">No cache on this backend.</p>'
    rows = "".join(
        "<tr>"
        f"<td>{_e(cache['name'])}</td>"
        f"<td>{_e(_bytes(cache.get('bytes')))} of {_e(_bytes(cache.get('capacity_bytes')))}</td>"
        f"<td>{_e(_format(cache.get('entries')))}</td>"
        f"<td>{_e(_percent(cache.get('hit_rate')))}</td>"
        f"<td>{_e(_format(cache.get('hits')))} / {_e(_format(cache.get('misses')))}</td>"
        f"<td>{_e(_format(cache.get('evictions')))}</td>"
        "</tr>"
        for cache in caches
    )
    return (
        "<table><thead><tr><th>cache</th><th>used</th><th>entries</th><th>hit rate</th><th>hits / misses</th>"
        f"<th>evictions</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _errors(errors: list[dict[str, Any]]) -> str:
    items = "".join(
        f'<li><time>{_e(_clock(error["time"]))}</time> <span class="level">{_e(error["level"])}</span> '
        f'<span class="logger">{_e(error["logger"])}</span><br><span class="message">{_e(error["message"])}</span></li>'
        for error in errors
    )
    empty = "" if errors else '<p class="empty">No warning or error since the backend started.</p>'
    return f'{empty}<ol class="errors" id="error-list">{items}</ol>'


def _limits(limits: list[tuple[str, str, Any, str]]) -> str:
    rows = "".join(
        f'<tr><td class="group">{_e(group)}</td><td><code>{_e(name)}</code></td>'
        f"<td>{_e(_format(value))}</td><td>{_e(meaning)}</td></tr>"
        for group, name, value, meaning in limits
    )
    return f"<table><tbody>{rows}</tbody></table>"


def _section(title: str, body: str, wide: bool = False, section_id: str | None = None) -> str:
    identity = f' id="{_e(section_id)}"' if section_id else ""
    return f'<section class="{"wide" if wide else ""}"{identity}><h2>{_e(title)}</h2>{body}</section>'


def _key_values(items: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<dt>{_e(key)}</dt><dd>{_e(_format(value))}</dd>" for key, value in items)
    return f"<dl>{rows}</dl>"


def _flatten(value: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested health fields as ("training_queue.running", 0) pairs."""
    items: list[tuple[str, Any]] = []
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            items += _flatten(item, f"{name}.")
        else:
            items.append((name, item))
    return items


# -- formatting (pure) -------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.0f}" if value == int(value) and abs(value) < 1e15 else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {_format(item)}" for key, item in list(value.items())[:MAX_SHOWN_LABELS])
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(item) for item in value[:MAX_SHOWN_LABELS])
    return str(value)


def _bytes(size: Any) -> str:
    if not isinstance(size, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"


def _percent(rate: Any) -> str:
    return "-" if rate is None else f"{100 * rate:.0f}%"


def _clock(unix_s: Any) -> str:
    if not isinstance(unix_s, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_s))
