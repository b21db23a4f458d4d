"""ASGI middleware: request id, one access-log line and the request metrics per HTTP request.

A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware: it adds no task or body buffering to
streaming responses, and because the inner app returns only after a stream's last event, the log line and the
latency are written when the stream ends, not when its headers go out.

The access line never carries a header (so never an API key) and never prompt text unless `log_prompts`.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability.context import RequestRecord, bind, unbind
from app.observability.metrics import UNMATCHED_ROUTE, Metrics

access_log = logging.getLogger("prefixserve.access")

REQUEST_ID_HEADER = "x-request-id"
# A client's id is echoed back and logged: accept only short, plain ids (no log or header injection).
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
PROMPT_CAPTURE_BYTES = 64 * 1024  # body kept for `log_prompts`; uploads are never kept


class ObservabilityMiddleware:
    """Wraps the whole app; `metrics` None means metrics are disabled (logging still happens)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics | None, log_prompts: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(request_id=_request_id(scope), started=time.perf_counter())
        status = 500  # what the client gets if the app raises before starting a response
        body = bytearray() if self.log_prompts and _is_json(scope) else None

        async def receive_tee() -> Message:
            message = await receive()
            if body is not None and message["type"] == "http.request" and len(body) < PROMPT_CAPTURE_BYTES:
                body.extend(message.get("body", b""))
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", record.request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        token = bind(record)
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive_tee, send_with_id)
        finally:
            unbind(token)
            seconds = time.perf_counter() - record.started
            route = _route_template(scope)
            if self.metrics is not None:
                self.metrics.in_flight.dec()
                self.metrics.observe_request(route=route, method=scope["method"], status=status,
                                             seconds=seconds, record=record)
            _log_access(scope, route, status, seconds, record, body)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate = bytes(value).decode("latin-1")
            if _CLIENT_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def _is_json(scope: Scope) -> bool:
    return any(name == b"content-type" and b"json" in value for name, value in scope.get("headers", []))


def _route_template(scope: Scope) -> str:
    """`/v1/prefixes/{name}` rather than the path itself (bounded label values, no tenant data in metrics)."""
    path = getattr(scope.get("route"), "path", None)
    return str(path) if isinstance(path, str) else UNMATCHED_ROUTE


def _log_access(scope: Scope, route: str, status: int, seconds: float, record: RequestRecord,
                body: bytearray | None) -> None:
    fields: dict[str, Any] = {
        "request_id": record.request_id,
        "method": scope["method"],
        "path": scope["path"],
        "route": route,
        "status": status,
        "latency_ms": round(seconds * 1e3, 1),
        "tenant_id": record.tenant_id,
        "model": record.model,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
    }
    ttft = record.ttft_s
    if ttft is not None:
        fields["ttft_ms"] = round(ttft * 1e3, 1)
    if body is not None:
        fields["prompt"] = _prompt_text(bytes(body))
    level = logging.WARNING if status >= 500 else logging.INFO
    access_log.log(level, "%s %s %d", scope["method"], scope["path"], status, extra=fields)


def _prompt_text(body: bytes) -> str | None:
    """The `prompt` or `messages` of a JSON request body, as JSON text (debug logging only)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    prompt = data.get("prompt", data.get("messages"))
    return None if prompt is None else json.dumps(prompt, ensure_ascii=False)
