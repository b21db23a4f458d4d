"""One exception tree for the service, turned into OpenAI-style error JSON in one place (`install_handlers`).

`{"error": {"message", "type", "param", "code"}}` — the shape the official `openai` client parses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of errors a client can see. Subclasses fix the status and type."""

    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers
        if code is not None:
            self.code = code


class InvalidRequest(ServiceError):
    pass


class Unauthorized(ServiceError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ServiceError):
    status_code = 403
    error_type = "permission_error"


class NotFound(ServiceError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    error_type = "conflict_error"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class Unprocessable(ServiceError):
    status_code = 422


class RateLimited(ServiceError):
    status_code = 429
    error_type = "rate_limit_error"


class Unavailable(ServiceError):
    status_code = 503
    error_type = "service_unavailable"


def database_busy() -> Unavailable:
    """No database thread or pooled connection came free in time: shed, the client retries."""
    return Unavailable("the database is busy; retry shortly", code="database_busy", headers={"Retry-After": "1"})


class RequestTimeout(ServiceError):
    """A generation outlived PREFIXSERVE_REQUEST_TIMEOUT_S (queued or running); the engine freed its row."""

    status_code = 504
    error_type = "timeout_error"
    code = "timeout"


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, object]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def invalid_fields(errors: Sequence[Any]) -> InvalidRequest:
    """The 400 for a request that failed validation (pydantic's errors): its first error, naming the field. Also
    what a Batch API request with a bad body gets (app/services/batch_lines.py), so both answer alike."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    if first.get("type") == "extra_forbidden" and param:  # a field the body does not declare
        return InvalidRequest(f"`{param}` is not supported", param=param, code="unsupported_parameter")
    return InvalidRequest(msg, param=param, code="invalid_value")


def install_handlers(app: FastAPI) -> None:
    """Map every error to the OpenAI error shape; anything unexpected is a logged 500 without internals."""

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.message, exc.error_type, exc.param, exc.code),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(sa_exc.OperationalError)
    @app.exception_handler(sa_exc.InterfaceError)
    async def _database(request: Request, exc: sa_exc.DBAPIError) -> JSONResponse:
        # The database is down or went away mid-request (stopped, restarted, connection cut), in a route or a
        # dependency (authentication included): a 503 the client retries. Only the class is logged: the
        # statement and its parameters may hold tenant data.
        log.warning("database unavailable during %s %s: %s", request.method, request.url.path,
                    type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__)
        return await _service(request, Unavailable("the database is unavailable; retry shortly",
                                                   headers={"Retry-After": "5"}))

    @app.exception_handler(sa_exc.TimeoutError)
    async def _pool_exhausted(request: Request, exc: sa_exc.TimeoutError) -> JSONResponse:
        # No pooled connection came free within PREFIXSERVE_DATABASE_POOL_TIMEOUT_S: shed, the client retries.
        log.warning("database pool exhausted during %s %s", request.method, request.url.path)
        return await _service(request, database_busy())

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _service(request, invalid_fields(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        etype = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), etype),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)
