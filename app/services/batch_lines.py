"""One request of a batch, answered exactly as its endpoint answers it: the same request model, the same serving
code (app/services/completions.py, chat.py), the same error bodies; only its engine requests are submitted at
batch priority (app/engine/protocol.py EngineClientProtocol.generate).

Its output line is OpenAI's: `{"id": "batch_req_...", "custom_id", "response": {"status_code", "request_id",
"body"}, "error": null}`. A failure that retrying cures (the engine's queue full, the database or the prefix store
unavailable) is not an answer: it raises `Transient`, and the runner runs the request again later.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ValidationError

from app.engine.protocol import EngineClientProtocol, TokenEvent
from app.errors import InvalidRequest, RateLimited, ServiceError, Unavailable, error_body, invalid_fields
from app.protocol.chat import ChatCompletionRequest
from app.protocol.completions import CompletionRequest
from app.services.access import Access
from app.services.batch_input import BatchLine
from app.services.chat import serve_chat
from app.services.completions import serve_completion
from app.services.db_calls import DbCalls


def database_unavailable() -> Unavailable:
    """What the API answers a request during a database outage (app/errors.py's handler)."""
    return Unavailable("the database is unavailable; retry shortly", headers={"Retry-After": "5"})


log = logging.getLogger(__name__)


class Transient(Exception):
    """The request could not be answered now for a reason that passes (the message says which)."""


@dataclass(frozen=True)
class LineOutcome:
    """A request's answer: its output line, which file it goes to, the tokens it used."""

    line: int
    ok: bool  # a 2xx answer: the output file; otherwise the error file
    record: str  # the output line (JSON, no newline)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class BatchPriorityEngine:
    """The engine as a batch request sees it: every generation is submitted at batch priority; everything else
    is the engine's own."""

    def __init__(self, engine: EngineClientProtocol) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, **kwargs: Any) -> AsyncIterator[TokenEvent]:
        return self._engine.generate(**{**kwargs, "priority": "batch"})


def _transient(exc: ServiceError) -> bool:
    """A 503 (database, prefix store or engine unavailable) or the engine's full queue: retrying cures it."""
    return isinstance(exc, Unavailable) or (isinstance(exc, RateLimited) and exc.code == "overloaded")


async def _answer(line: BatchLine, *, endpoint: str, access: Access, db_calls: DbCalls,
                  engine: EngineClientProtocol, fingerprint: str) -> dict[str, Any]:
    """The endpoint's response body for the request (raises its ServiceError)."""
    model: type[CompletionRequest] | type[ChatCompletionRequest] = (
        CompletionRequest if endpoint == "/v1/completions" else ChatCompletionRequest)
    try:
        req = model.model_validate(line.body)
    except ValidationError as exc:
        raise invalid_fields(exc.errors()) from None
    if req.stream:
        raise InvalidRequest("stream: a batch's requests are answered whole, not streamed", param="stream")
    kwargs: dict[str, Any] = {"access": access, "db_calls": db_calls, "engine": BatchPriorityEngine(engine),
                              "fingerprint": fingerprint}
    result: BaseModel | AsyncIterator[str]
    if isinstance(req, CompletionRequest):
        result = await serve_completion(req, **kwargs)
    else:
        result = await serve_chat(req, **kwargs)
    assert isinstance(result, BaseModel)  # not streamed
    body: dict[str, Any] = result.model_dump(mode="json")  # what the endpoint's JSONResponse sends
    return body


async def run_line(line: BatchLine, *, endpoint: str, access: Access, db_calls: DbCalls,
                   engine: EngineClientProtocol, fingerprint: str, last_try: bool = False) -> LineOutcome:
    """Answer one request of a batch; raises Transient when it should be run again later (unless `last_try`:
    then that failure is its answer)."""
    try:
        body = await _answer(line, endpoint=endpoint, access=access, db_calls=db_calls, engine=engine,
                             fingerprint=fingerprint)
        status = 200
    except ServiceError as exc:
        if _transient(exc) and not last_try:
            raise Transient(exc.message) from None
        status, body = exc.status_code, error_body(exc.message, exc.error_type, exc.param, exc.code)
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:  # the database went away mid-request
        if not last_try:
            raise Transient(f"the database is unavailable ({type(exc).__name__})") from None
        down = database_unavailable()
        status, body = down.status_code, error_body(down.message, down.error_type, down.param, down.code)
    except Exception:  # a bug: the endpoint's answer would be its logged 500 (app/errors.py), so is this one's
        log.exception("batch request on line %d failed unexpectedly", line.line)
        status, body = 500, error_body("internal server error", "server_error")
    record = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
              "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
              "error": None}
    usage = body.get("usage") if status == 200 else None
    return LineOutcome(line.line, status == 200, json.dumps(record, separators=(",", ":")),
                       prompt_tokens=int(usage["prompt_tokens"]) if usage else 0,
                       completion_tokens=int(usage["completion_tokens"]) if usage else 0)
