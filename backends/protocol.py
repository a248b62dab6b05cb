"""Label Studio 1.23's ML-backend wire format: request and answer bodies, project ids, results.

Bodies allow extra fields (Label Studio adds some between versions); the models document the
endpoints in the OpenAPI schema (`/openapi.json`), which fuzzers can read.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from backends.errors import BadRequest
from backends.model_base import ModelResponse

# -- request bodies (extra fields allowed: Label Studio adds fields between versions) ---------


class _Body(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")


class SetupRequest(_Body):
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


class PredictRequest(_Body):
    tasks: list[dict[str, Any]]
    project: str | int | None = None
    label_config: str | None = None
    params: PredictParams | None = None


class WebhookRequest(_Body):
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


def project_id_of(project: Any) -> str:
    """Label Studio's project reference as a plain id: "12.1700000000" -> "12", {"id": 12} -> "12"."""
    if project is None:
        return ""
    if isinstance(project, dict):
        project = project.get("id")
        if project is None:
            raise BadRequest("webhook project has no id")
    return str(project).split(".", 1)[0].strip()


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
