"""Turning a serving result into the HTTP response: JSON, or Server-Sent Events as OpenAI streams them."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

SSE_PING_S = 15  # comment lines keep proxies from closing a quiet stream; OpenAI clients ignore them


def respond(result: BaseModel | AsyncIterator[str]) -> Response | EventSourceResponse:
    """A model as JSON; an iterator of payloads as `data: <payload>` events (the last one is `[DONE]`)."""
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    # sep="\n": the exact framing OpenAI's servers use; no-transform/no buffering for reverse proxies.
    return EventSourceResponse(result, sep="\n", ping=SSE_PING_S,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
