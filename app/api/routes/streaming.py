"""Turning a serving result into the HTTP response: JSON, or Server-Sent Events as OpenAI streams them."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

SSE_PING_S = 15  # comment lines keep proxies from closing a quiet stream; OpenAI clients ignore them


class _EventStream(EventSourceResponse):
    """An SSE response that ends quietly when its client stops reading (sse-starlette's send timeout)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            # The generator has been closed by now, which cancelled the engine requests.
            log.info("closed a stream whose client took nothing for %s s", self.send_timeout)


def respond(result: BaseModel | AsyncIterator[str], *, send_timeout_s: float | None = None
            ) -> Response | EventSourceResponse:
    """A model as JSON; an iterator of payloads as `data: <payload>` events (the last one is `[DONE]`).
    A stream whose client takes no message for `send_timeout_s` is closed (its generation cancelled): a client
    that stops reading but keeps the connection open would otherwise hold the request forever."""
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    # sep="\n": the exact framing OpenAI's servers use; no-transform/no buffering for reverse proxies.
    return _EventStream(result, sep="\n", ping=SSE_PING_S, send_timeout=send_timeout_s,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def receive_disconnect(receive: Receive) -> Callable[[], Awaitable[None]]:
    """A waiter that returns when the ASGI `receive` reports `http.disconnect` (the body is already read)."""

    async def wait() -> None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                return

    return wait
