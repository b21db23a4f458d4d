"""The record of the HTTP request being served, filled in by whichever layer knows a fact.

The middleware opens a `RequestRecord` per request and puts it in a context variable; authentication notes the
tenant, the serving core notes the model, the token counts and the first token's time. The record is a mutable
object, so writes from tasks and worker threads that copied the context (FastAPI runs sync dependencies in a
thread pool; the serving core pumps engine events in its own tasks) land in the one record the middleware reads
when the response ends. Outside a request (`current()` is None) every `note_*` call does nothing.

Stdlib only: the services and the API layer import this module, never the metrics or the middleware.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token
from dataclasses import dataclass


@dataclass
class RequestRecord:
    """What the access log line and the request metrics report about one request."""

    request_id: str
    started: float  # time.perf_counter() when the request arrived
    tenant_id: str | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None  # perf_counter() of the first generated token (any choice)

    @property
    def ttft_s(self) -> float | None:
        """Seconds from arrival to the first generated token; None if nothing was generated."""
        return None if self.first_token_at is None else self.first_token_at - self.started


_current: ContextVar[RequestRecord | None] = ContextVar("prefixserve_request", default=None)


def current() -> RequestRecord | None:
    """The record of the request being served in this context, if any."""
    return _current.get()


def bind(record: RequestRecord) -> Token[RequestRecord | None]:
    """Make `record` current; returns the token for `unbind`."""
    return _current.set(record)


def unbind(token: Token[RequestRecord | None]) -> None:
    _current.reset(token)


def note_tenant(tenant_id: str | None) -> None:
    rec = _current.get()
    if rec is not None:
        rec.tenant_id = tenant_id


def note_model(model: str) -> None:
    """The model as the client named it (noted before it is resolved, so a 404 is logged with it too)."""
    rec = _current.get()
    if rec is not None:
        rec.model = model


def note_prompt(prompt_tokens: int) -> None:
    """The prompt length, counted once per request (not per choice), as OpenAI's `usage` does."""
    rec = _current.get()
    if rec is not None:
        rec.prompt_tokens = prompt_tokens


def note_event(*, has_token: bool, completion_tokens: int | None) -> None:
    """An engine event arrived: the first one carrying a token fixes time-to-first-token; a choice's final
    event (`completion_tokens` not None) adds the tokens that choice generated."""
    rec = _current.get()
    if rec is None:
        return
    if has_token and rec.first_token_at is None:
        rec.first_token_at = time.perf_counter()
    if completion_tokens is not None:
        rec.completion_tokens += completion_tokens
