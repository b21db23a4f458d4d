"""Batch-priority requests on the engine thread: their events are held until the final one, so a preempted row can
start again from its first token without its consumer ever seeing the abandoned run.

Admission (admission.py) may take a running batch row out of the batch to make room for an interactive request.
The row's KV cache is dropped with it; the request goes back to the ready queue as a fresh `BatchRequest` (same
request, same id, same resolved prefix) and is prefilled again when there is room. Because nothing of the first
run was delivered, the consumer sees exactly one complete run: the same tokens as if it had never been preempted
(greedy and seeded sampling restart their generator with the row; the engine's batch-invariance contract).
"""

from __future__ import annotations

from collections.abc import Callable

from app.engine.detok import Decoder
from app.engine.rowstate import ActiveRequest
from app.engine.types import GenerationRequest, TokenEvent


class BatchRequest(ActiveRequest):
    """An ActiveRequest whose events go out all at once, with its final event."""

    def __init__(self, request: GenerationRequest, tokenizer: Decoder, deliver: Callable[[TokenEvent], object]
                 ) -> None:
        self._held: list[TokenEvent] = []
        self._deliver = deliver
        self._tokenizer = tokenizer
        super().__init__(request, tokenizer, self._hold)

    def _hold(self, ev: TokenEvent) -> None:
        self._held.append(ev)
        if ev.final:
            held, self._held = self._held, []
            for e in held:
                self._deliver(e)

    def restarted(self) -> BatchRequest:
        """A fresh copy of this request (nothing generated, events not yet delivered dropped), its prefix kept
        resolved. This one is spent: it emits nothing more."""
        fresh = BatchRequest(self.request, self._tokenizer, self._deliver)
        fresh.prefix = self.prefix
        self._held = []
        self.done = True
        return fresh


def held_events_bound(request: GenerationRequest, default: int) -> int:
    """How many undelivered events a request's consumer queue must take: a batch request's arrive together (one per
    token, plus the final one), so its queue holds them all; an interactive one keeps the engine's bound."""
    if request.priority == "batch":
        return max(default, request.sampling.max_tokens + 2)
    return default
