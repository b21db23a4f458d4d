"""The per-request event queue between the engine thread and a request's consumer on its event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from app.engine.types import TokenEvent

log = logging.getLogger(__name__)


class EventQueue:
    """One request's events on its event loop, bounded. A consumer that stops taking them (a client that no
    longer reads its stream) gets its request cancelled once `maxsize` events wait, so it costs at most that
    many buffered events and frees its batch row, instead of buffering every token up to max_tokens."""

    def __init__(self, request_id: str, maxsize: int, on_overflow: Callable[[], None]) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue(maxsize)
        self._on_overflow = on_overflow
        self.overflowed = False

    def put(self, ev: TokenEvent) -> None:
        """On the event loop's thread (delivered from the engine's outbox)."""
        if self.overflowed:
            return
        try:
            self._queue.put_nowait(ev)
        except asyncio.QueueFull:
            self.overflowed = True
            log.warning("request %s: its consumer stopped reading (%d events waiting); cancelling it",
                        self.request_id, self._queue.maxsize)
            self._on_overflow()

    async def get(self) -> TokenEvent:
        """The next event; after an overflow, the buffered ones and then a final "cancelled" event."""
        if self.overflowed and self._queue.empty():
            return TokenEvent(self.request_id, None, "", finish_reason="cancelled",
                              error="cancelled: the consumer stopped reading its events")
        return await self._queue.get()


# Events of one engine step, with the event loop each one's consumer lives on.
Outbox = list[tuple[asyncio.AbstractEventLoop, EventQueue, TokenEvent]]


def deliver(items: list[tuple[EventQueue, TokenEvent]]) -> None:
    for q, ev in items:
        q.put(ev)


def post(outbox: Outbox) -> None:
    """From the engine thread: hand a step's events to their event loops, one wake-up per loop (a wake-up per
    token would keep the asyncio thread contending for the GIL while the model runs)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[EventQueue, TokenEvent]]] = {}
    for loop, q, ev in outbox:
        by_loop.setdefault(loop, []).append((q, ev))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(deliver, items)
        except RuntimeError:  # the client's event loop is closed: nobody is listening any more
            log.debug("dropped %d events for a closed event loop", len(items))
