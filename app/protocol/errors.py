"""The error body every endpoint answers with (OpenAI's shape), declared in the OpenAPI document.

`ERROR_RESPONSES` is added to every router (app/main.py), so clients and schema-driven tests know each status
an endpoint may answer and that its body is `{"error": {...}}` (the app's validation errors are 400s in this
shape, never FastAPI's default 422 body).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description, **extra}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("Invalid request: the message and `param` say what is wrong"),
    401: _error("Missing or invalid API key"),
    403: _error("The key may not do this (scope, or the admin key on tenant data)"),
    404: _error("No such object (another tenant's objects answer exactly like missing ones)"),
    409: _error("Conflict (a name taken, a concurrent update)"),
    413: _error("The upload is larger than the limit"),
    429: _error("A tenant limit (the message names it) or the server's queue is full", headers=_RETRY_AFTER),
    "4XX": _error("Another client error"),
    503: _error("A store the request needs is unavailable, or the model is not loaded", headers=_RETRY_AFTER),
    504: _error("The request timed out (queued or generating)"),
}
