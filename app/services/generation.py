"""Run a request's choices on the engine: `Generation` submits them (prompts x n) as engine requests and merges
their events. It is started with `start_generation`, which waits for the first event of every choice: admission
errors (too large, overloaded) and prefix-load failures therefore become plain HTTP errors before any stream
begins. Closing it, or the client disconnecting, cancels every engine request still running.

The engine is reached through app/engine/protocol.py, torch-free, so the web layer imports it at the top.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import cast

from app.engine.protocol import (
    EngineClientProtocol,
    EngineOverloaded,
    RequestTooLarge,
    SamplingParams,
    StructuredOutputError,
    TokenEvent,
)
from app.errors import InvalidRequest, RateLimited, RequestTimeout, ServiceError, Unavailable, error_body
from app.observability.context import note_event, note_prompt
from app.services.targets import ModelTarget

log = logging.getLogger(__name__)

OVERLOAD_RETRY_AFTER_S = "1"
EVENT_BUFFER = 256  # merged events of one API request waiting for its consumer


def engine_exception(exc: Exception) -> ServiceError:
    """An exception raised by the engine at submission, as the client's error."""
    if isinstance(exc, StructuredOutputError):  # a schema, regex or grammar the engine could not compile
        return InvalidRequest(f"{exc.param}: {exc}", param=exc.param)
    if isinstance(exc, RequestTooLarge):
        return InvalidRequest(str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, EngineOverloaded):
        return RateLimited(f"the server is busy ({exc}); retry shortly", code="overloaded",
                           headers={"Retry-After": OVERLOAD_RETRY_AFTER_S})
    log.error("engine failed at submission: %r", exc)
    return Unavailable("the engine could not take the request; retry shortly", code="engine_error",
                       headers={"Retry-After": "5"})


def event_error(ev: TokenEvent) -> ServiceError:
    """An engine event that ended without "stop"/"length" (error, cancelled) as the client's error."""
    msg = ev.error or f"generation ended: {ev.finish_reason}"
    if ev.error_kind == "prefix_unavailable":
        return Unavailable(msg, param="model", code="prefix_unavailable")
    if ev.error_kind == "too_large":
        return InvalidRequest(msg, param="max_tokens", code="context_length_exceeded")
    if ev.error_kind == "timeout":
        return RequestTimeout(msg)
    log.error("engine error event for %s: %s", ev.request_id, msg)
    return Unavailable(f"the engine failed: {msg}", code="engine_error", headers={"Retry-After": "5"})


class ClientDisconnected(Exception):
    """The client went away; nothing is sent back."""


_DISCONNECTED = object()


class Generation:
    """The engine requests of one API request (one per choice), their events merged in arrival order."""

    def __init__(self, streams: list[AsyncIterator[TokenEvent]],
                 disconnected: Callable[[], Awaitable[None]] | None = None) -> None:
        self.n = len(streams)
        # Bounded: when the consumer stalls (a client that stopped reading its stream), the pumps wait, the
        # engine's own per-request queue fills, and the engine cancels the rows (app/engine/event_queue.py).
        self._queue: asyncio.Queue[object] = asyncio.Queue(EVENT_BUFFER)
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]
        self._watch = asyncio.create_task(self._watch_disconnect(disconnected)) if disconnected else None
        self._buffer: list[tuple[int, TokenEvent]] = []
        self._open = self.n

    async def _pump(self, index: int, stream: AsyncIterator[TokenEvent]) -> None:
        try:
            async for ev in stream:
                note_event(has_token=ev.token_id is not None,
                           completion_tokens=ev.completion_tokens if ev.final else None)  # access log, metrics
                await self._queue.put((index, ev))
        except Exception as exc:  # admission errors: RequestTooLarge, EngineOverloaded
            await self._queue.put(exc)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _watch_disconnect(self, disconnected: Callable[[], Awaitable[None]]) -> None:
        await disconnected()
        await self._queue.put(_DISCONNECTED)

    async def _next(self) -> tuple[int, TokenEvent]:
        item = await self._queue.get()
        if item is _DISCONNECTED:
            self.close()
            raise ClientDisconnected
        if isinstance(item, Exception):
            self.close()
            raise engine_exception(item)
        index, ev = cast("tuple[int, TokenEvent]", item)
        if ev.final and ev.finish_reason not in ("stop", "length"):  # failed, cancelled, timed out
            self.close()
            raise event_error(ev)
        return index, ev

    async def start(self) -> None:
        """Wait for every choice's first event; raise the client's error if one failed to start."""
        started: set[int] = set()
        while len(started) < self.n:
            index, ev = await self._next()
            started.add(index)
            self._buffer.append((index, ev))

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(choice index, event) until every choice has its final event; a choice that ends in an error raises
        its ServiceError (event_error) instead, and the other choices are cancelled."""
        try:
            while self._open:
                index, ev = self._buffer.pop(0) if self._buffer else await self._next()
                if ev.final:
                    self._open -= 1
                yield index, ev
        finally:
            self.close()

    def stop_watching(self) -> None:
        """Stop reading ASGI `receive` (a streaming response takes over watching for the disconnect)."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def close(self) -> None:
        """Cancel every engine request still running (their iterators' cleanup cancels them in the engine)."""
        for task in self._tasks:
            task.cancel()
        self.stop_watching()


async def start_generation(engine: EngineClientProtocol, *, requests: Sequence[tuple[list[int], SamplingParams]],
                           prompt_tokens: int, target: ModelTarget,
                           disconnected: Callable[[], Awaitable[None]] | None = None) -> Generation:
    """Submit one engine request per (prompt ids, sampling) pair, the choice of its index, and wait until each
    has started (see `Generation.start`). `prompt_tokens`: the request's prompt tokens, each prompt counted once."""
    base = uuid.uuid4().hex
    note_prompt(prompt_tokens)
    streams = [engine.generate(prompt_ids=ids, sampling=p, prefix=target.prefix, request_id=f"{base}-{i}")
               for i, (ids, p) in enumerate(requests)]
    gen = Generation(streams, disconnected)
    try:
        await gen.start()
    except BaseException:
        gen.close()
        raise
    return gen


async def collect(gen: Generation) -> list[list[TokenEvent]]:
    """Every choice's events, in order; raises the client's error if a choice ended in an error."""
    out: list[list[TokenEvent]] = [[] for _ in range(gen.n)]
    async for index, ev in gen.events():
        out[index].append(ev)
    return out


def error_payload(exc: ServiceError) -> str:
    """The JSON of an error sent inside a stream (the OpenAI client raises it as an APIError)."""
    return json.dumps(error_body(exc.message, exc.error_type, exc.param, exc.code))
