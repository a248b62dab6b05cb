"""Label Studio 1.23's ML-backend wire format: request and answer bodies, project ids, results.

Bodies allow extra fields (Label Studio adds some between versions); the models document the
endpoints in the OpenAPI schema (`/openapi.json`), which fuzzers can read. What the server reads
out of a body (project ids, predict's arguments, a task's image URI) is checked here, once, so
models never see a project id that is not a number or a string that is not valid Unicode.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, Literal

import pydantic

from backends.errors import BadRequest
from backends.server.model_base import ModelResponse

# -- request bodies (extra fields allowed: Label Studio adds fields between versions) ---------


class _Body(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")


class _RequestBody(_Body):
    """A request body; every string in it (keys included) must be valid Unicode.

    JSON's \\uXXXX escapes can spell a lone UTF-16 surrogate ("\\ud800"), which Python decodes into
    a str that cannot be encoded again: echoed in an answer, written to a log or a path, or parsed
    as XML it fails far from here. Such a body is refused with a 400 before any route sees it.
    """

    @pydantic.model_validator(mode="before")
    @classmethod
    def _refuse_lone_surrogates(cls, body: Any) -> Any:
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")  # C speed: bodies hold long RLE lists
        except UnicodeEncodeError:
            where = _lone_surrogate_at(body) or "a string"
            where = where if len(where) <= 80 else where[:77] + "..."
            # BadRequest, not ValueError: pydantic passes it through and the server answers 400.
            raise BadRequest(
                f"malformed JSON body: {where} holds a lone UTF-16 surrogate "
                "(an unpaired \\ud800-\\udfff escape), which is not valid Unicode"
            ) from None
        except (TypeError, ValueError, RecursionError):  # not JSON-like, or absurdly deep: pydantic's turn
            pass
        return body


def _lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (or key) in `value` that UTF-8 cannot encode, else None."""
    if isinstance(value, str):
        return None if _encodable(value) else (path or "the body")
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and not _encodable(key):
            return f"a key in {path or 'the body'}"
        found = _lone_surrogate_at(item, where)
        if found is not None:
            return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class SetupRequest(_RequestBody):
    project: str | int = pydantic.Field(description='"<project id>.<created timestamp>"')
    label_config: str = pydantic.Field(alias="schema", description="the project's label config XML")
    hostname: str | None = pydantic.Field(None, description="Label Studio's URL as it sees itself")
    access_token: str | None = pydantic.Field(None, description="legacy token of the project creator")
    extra_params: dict[str, Any] | None = None


class PredictParams(_Body):
    login: str | None = None
    password: str | None = None
    context: dict[str, Any] | None = pydantic.Field(
        None, description='interactive prompts: {"result": [region, ...]}; null for batch predictions'
    )


class PredictRequest(_RequestBody):
    tasks: list[dict[str, Any]]
    project: str | int | None = None
    label_config: str | None = None
    params: PredictParams | None = None


class WebhookRequest(_RequestBody):
    action: str
    project: dict[str, Any] | str | int | None = None


# -- answers (documented in the OpenAPI schema; extra fields allowed) --------------------------


class ErrorResponse(pydantic.BaseModel):
    error: str = pydantic.Field(description="what was wrong")
    details: list[dict[str, str]] | None = pydantic.Field(None, description="per field, for invalid bodies")


class HealthResponse(_Body):
    status: Literal["UP", "DEGRADED"]
    model_class: str


class SetupResponse(_Body):
    model_version: str


class PredictResponse(_Body):
    results: list[Any] = pydantic.Field(description="one prediction per task, in task order")


class WebhookResponse(_Body):
    status: Literal["ok", "ignored"]


class VersionsResponse(_Body):
    versions: list[Any]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "bad request: malformed JSON, unusable label config, absurd prompt"),
        (401, "basic auth required"),
        (413, "body over MAX_REQUEST_MB"),
        (422, "invalid body, or an image that cannot be fetched or decoded"),
        (500, "internal error"),
    )
}


# Label Studio sends "<project id>.<created timestamp>" to /setup and /predict, the id alone (an
# integer) in webhooks. Ids become folder names and metric labels: nothing else is accepted.
_PROJECT_ID = re.compile(r"([0-9]{1,19})(?:\.[0-9]+)?")


def project_id_of(project: Any) -> str:
    """Label Studio's project reference as a plain id: "12.1700000000" -> "12", 12 -> "12",
    {"id": 12} -> "12"; None -> "" (no project).

    Raises BadRequest for anything else (negative, fractional, text, a path, a NUL byte, more than
    19 digits), so a project id is always safe as a file name and a bounded metric label.
    """
    if project is None:
        return ""
    if isinstance(project, dict):
        project = project.get("id")
        if project is None:
            raise BadRequest("webhook project has no id")
    match = None
    if isinstance(project, str):
        match = _PROJECT_ID.fullmatch(project.strip())
    elif isinstance(project, int) and not isinstance(project, bool):
        match = _PROJECT_ID.fullmatch(str(project))
    if match is None:
        shown = ascii(project)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise BadRequest(f'project must be a Label Studio project id, an integer or "<id>.<timestamp>"; got {shown}')
    return str(int(match.group(1)))


# predict(tasks, context=..., **params): keys of params that would collide with these arguments.
_PREDICT_ARGUMENTS = frozenset({"self", "tasks", "context"})


def predict_arguments(params: PredictParams | None) -> tuple[dict | None, dict[str, Any]]:
    """The request's params as (interactive context or None, keyword arguments for `predict`).

    Label Studio sends login, password and context; other keys pass through as upstream's server
    passes them, except names predict's own arguments take (self, tasks, context), which are dropped.
    """
    fields = params.model_dump() if params is not None else {}
    context = fields.pop("context", None)
    kwargs = {name: value for name, value in fields.items() if name not in _PREDICT_ARGUMENTS}
    return context, kwargs


def image_uri_of(task: Any, key: str) -> str:
    """The image URI of a Label Studio task, `task["data"][key]`: a non-empty string.

    Raises BadRequest naming the task when the task or its data is not an object, or the URI is
    missing, empty or not a string.
    """
    task_id = task.get("id") if isinstance(task, dict) else None
    name = f"task {task_id}" if isinstance(task_id, int) and not isinstance(task_id, bool) else "a task"
    data = task.get("data") if isinstance(task, dict) else None
    if not isinstance(data, dict):
        raise BadRequest(f"{name} has no data object (got {type(data).__name__}), so no image URI in data.{key}")
    uri = data.get(key)
    if not isinstance(uri, str) or not uri.strip():
        raise BadRequest(f"{name} has no image URI in data.{key} (got {type(uri).__name__})")
    return uri


def predictions_of(response: ModelResponse | list | None, model_version: str) -> list:
    """The `results` list Label Studio reads: one entry per task, each with a `model_version`."""
    if response is None:
        return []
    if isinstance(response, ModelResponse):
        version = response.model_version or model_version
        predictions = list(response.predictions)
    elif isinstance(response, list):
        version = model_version
        predictions = list(response)
    else:
        raise TypeError(f"predict returned {type(response).__name__}; expected ModelResponse, list or None")
    results = []
    for prediction in predictions:
        if isinstance(prediction, pydantic.BaseModel):
            prediction = prediction.model_dump()
        if isinstance(prediction, dict) and prediction.get("model_version") is None:
            prediction = {**prediction, "model_version": version}
        results.append(prediction)
    return results
