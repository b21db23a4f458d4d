"""The scheduler thread: admission under budgets, prefill + concatenate, decode steps, events back to asyncio.

Continuous batching at step granularity: each iteration prefills the requests that became ready (with their
prefixes) as one new batch, merges it into the running batch, runs one decode step for all rows and filters out
the finished or cancelled ones. Rows never wait for the batch to drain. The model runs only on this thread (torch
releases the GIL); the asyncio side talks to it through a thread-safe intake queue and per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

import torch

from app.engine.admission import EngineLimits, EngineStats, admit
from app.engine.batch import Batch, KVGeometry, NewRow
from app.engine.book import RequestBook
from app.engine.detok import Decoder
from app.engine.event_queue import EventQueue, Outbox, post
from app.engine.intake import Intake
from app.engine.priority import BatchRequest, held_events_bound
from app.engine.rowstate import ActiveRequest
from app.engine.runner import ModelRunner
from app.engine.sampling import SamplerState, select_tokens
from app.engine.types import GenerationRequest, RequestTooLarge, TokenEvent

log = logging.getLogger(__name__)


class Engine:
    """Owns the model thread. `submit` is the one entry point for the async side."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Decoder,
        *,
        geometry: KVGeometry,
        pad_token_id: int,
        eos_token_ids: frozenset[int],
        limits: EngineLimits | None = None,
    ) -> None:
        self.runner = ModelRunner(model)
        self.tokenizer = tokenizer
        self.geometry = geometry
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids
        self.limits = limits or EngineLimits()
        self.stats = EngineStats()
        self.requests = RequestBook(stats=self.stats, max_waiting=self.limits.max_waiting)
        self._running: Batch | None = None
        # Events of one step, delivered with one wake-up per event loop: a wake-up per token would keep the
        # asyncio thread contending for the GIL while the model runs (measured: ~40% slower steps on 2 cores).
        self._outbox: Outbox = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        # Set while the thread waits for work with nothing in flight (observable: the next arrival wakes it
        # and opens the coalescing window).
        self.idle = threading.Event()
        self._intake = Intake(resolver_threads=self.limits.resolver_threads, wake=self._wake.set)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._intake.clear()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- async side ------------------------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Queue a request; yield its token events until the final one. Leaving the iterator early cancels it."""
        need = len(request.prompt_ids) + request.sampling.max_tokens
        if need > self.limits.max_batch_tokens or len(request.prompt_ids) >= self.limits.max_positions:
            raise RequestTooLarge(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.sampling.max_tokens}) exceeds "
                f"the engine budget of {min(self.limits.max_batch_tokens, self.limits.max_positions)} tokens"
            )
        self.requests.take_place()
        loop = asyncio.get_running_loop()
        events = EventQueue(request.request_id, held_events_bound(request, self.limits.max_buffered_events),
                             lambda: self.cancel(request.request_id))
        # Only the engine thread emits; events wait in the outbox until the end of the step.
        kind = BatchRequest if request.priority == "batch" else ActiveRequest
        active = kind(request, self.tokenizer, lambda ev: self._outbox.append((loop, events, ev)))
        # A batch request waits behind interactive traffic by design; the Batch API's window bounds it instead.
        if self.limits.request_timeout_s is not None and request.priority != "batch":
            active.deadline = time.monotonic() + self.limits.request_timeout_s
        self._intake.put(active)
        self._wake.set()
        finished = False
        try:
            while True:
                ev = await events.get()
                yield ev
                if ev.final:
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel(request.request_id)

    def cancel(self, request_id: str) -> None:
        """Ask for a request to leave; it does so at the next step."""
        self.requests.cancel(request_id)
        self._wake.set()

    def fail_all_requests(self, why: str) -> None:
        """End every request queued or running now with an error event (kind "internal", message `why`), at the
        next step. For a server whose shutdown grace period ran out: each stream still gets its error chunk and
        `[DONE]` instead of a cut connection. The engine keeps running; later submissions are served."""
        self.requests.fail_all(why)
        self._wake.set()

    # ---- engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                idle = self._step()
            except Exception:
                # A bug in the book-keeping must not kill the thread (every later request would hang): fail
                # what is in flight, start from an empty batch, and keep serving.
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all("internal error in the engine", keep_running=True)
                idle = False
            self._flush_events()
            if idle:
                self.idle.set()
                woken = self._wake.wait(0.05 if self._intake.resolving else 1.0)
                self.idle.clear()
                self._wake.clear()
                if woken and self.limits.coalesce_s > 0:
                    self._stop.wait(self.limits.coalesce_s)
        self._fail_all("engine stopped")
        self._flush_events()

    def _step(self) -> bool:
        """One scheduling round: intake, cancellations, deadlines, admission + prefill, one decode step.
        Returns whether there was nothing to do."""
        self._take_intake()
        self._apply_cancellations()
        self._expire()
        new_rows = self._admit()
        if new_rows:
            self._prefill(new_rows)
        if self._running is not None:
            self._decode()
        return self._running is None and not self._intake.ready and not new_rows

    def _flush_events(self) -> None:
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            post(outbox)

    def _take_intake(self) -> None:
        for active in self._intake.take_new():
            self.requests.add(active)
        for active, exc in self._intake.poll():
            self.requests.finish(active, "error", error=f"prefix could not be loaded: {exc}", kind="prefix_unavailable")

    def _apply_cancellations(self) -> None:
        cancelled, reason = self.requests.take_asks()
        for rid in cancelled:
            active = self.requests.active.get(rid)
            if active is not None:
                self.requests.finish(active, "cancelled")
        if reason is not None:
            self._fail_all(reason)
        if cancelled or reason is not None:
            self._drop_finished()

    def _expire(self) -> None:
        """End the requests past their deadline, wherever they are (queued, loading a prefix, running)."""
        if self.limits.request_timeout_s is None or not self.requests.active:
            return
        late = self.requests.late(time.monotonic())
        for active in late:
            self.requests.finish(active, "error", kind="timeout",
                         error=f"the request timed out after {self.limits.request_timeout_s:g} s")
        if late:
            self._drop_finished()

    def _drop_finished(self) -> None:
        """Remove requests that just finished (cancelled, failed, timed out) from the ready queue and the batch."""
        self._intake.drop_done()
        self._filter_running()

    def _admit(self) -> list[ActiveRequest]:
        if not self._intake.ready:
            return []
        rows = self._running.rows if self._running is not None else []
        running = [a for r in rows if (a := self.requests.active.get(r.request_id)) is not None]
        decided = admit(self._intake.ready, running=running, limits=self.limits)
        for active, why in decided.refused:
            self.requests.finish(active, "error", kind="too_large", error=why)
        if decided.preempted:
            self._preempt(decided.preempted)
        return decided.admitted

    def _preempt(self, rows: list[ActiveRequest]) -> None:
        """Take batch rows out of the running batch and queue each again from its start (app/engine/priority.py),
        first among the batch requests waiting."""
        for old in rows:
            assert isinstance(old, BatchRequest)
            fresh = old.restarted()
            self.requests.requeued(fresh)
            self._intake.ready.appendleft(fresh)
        self.stats.preempted += len(rows)
        self._filter_running()

    def _prefill(self, admitted: list[ActiveRequest]) -> None:
        for a in admitted:
            self.requests.leave_queue(a)
        dev = self.geometry.device
        new_rows = [
            NewRow(a.request_id, a.request.prompt_ids, a.prefix,
                   SamplerState.create(a.request.sampling, dev, end_token_ids=self.eos_token_ids,
                                       prompt_ids=a.request.prompt_ids))
            for a in admitted
        ]
        for row, a in zip(new_rows, admitted, strict=True):  # structured outputs: compiled before it came in
            if a.request.grammar is not None:
                row.sampler.grammar = a.request.grammar.restart()  # from the start (a row prefilled again too)
        try:
            batch = Batch.from_requests(new_rows, geometry=self.geometry, pad_token_id=self.pad_token_id)
            logits = self.runner.forward(batch)
            self.stats.prefills += 1
            self._choose(batch, logits)
        except Exception as exc:  # only the rows of this prefill fail
            log.exception("prefill failed")
            for a in admitted:
                self.requests.finish(a, "error", kind="internal",
                                     error=f"internal error during prefill: {type(exc).__name__}")
            return
        # Rows that finished on their first token (EOS, a stop string, max_tokens=1) already left the book.
        kept = batch.filter({r.request_id for r in batch.rows if r.request_id in self.requests.active})
        if kept is not None:
            self._running = kept if self._running is None else Batch.concatenate([self._running, kept])

    def _decode(self) -> None:
        batch = self._running
        assert batch is not None
        try:
            logits = self.runner.forward(batch)
            self.stats.steps += 1
            self.stats.batch_sizes.append(len(batch))
            self._choose(batch, logits)
        except Exception as exc:
            log.exception("decode step failed")
            for r in batch.rows:
                active = self.requests.active.get(r.request_id)
                if active is not None:
                    self.requests.finish(active, "error", error=f"internal error: {type(exc).__name__}",
                                         kind="internal")
        self._filter_running()

    def _choose(self, batch: Batch, logits: torch.Tensor) -> None:
        """Select one token per row [B, V] -> B tokens, stream them, and advance the batch."""
        choices = select_tokens(logits, [r.sampler for r in batch.rows])
        batch.advance([c.token_id for c in choices])
        self.stats.generated_tokens += len(choices)
        for row, choice in zip(batch.rows, choices, strict=True):
            active = self.requests.active[row.request_id]
            active.on_token(
                choice,
                eos=self.eos_token_ids,
                at_context_end=row.last_position + 1 >= self.limits.max_positions,
            )
            if active.done:
                self.requests.active.pop(active.request_id, None)

    def _filter_running(self) -> None:
        if self._running is None:
            return
        # A queued request is not in the batch: a preempted row's id now names its restarted copy.
        alive = {r.request_id for r in self._running.rows
                 if (a := self.requests.active.get(r.request_id)) is not None and not a.queued}
        self._running = self._running.filter(alive)
        self.stats.running_rows = len(self._running) if self._running is not None else 0

    def _fail_all(self, why: str, *, keep_running: bool = False) -> None:
        """Fail every request the engine holds; with keep_running, also reset to an empty batch and queues."""
        for active in list(self.requests.active.values()):
            self.requests.finish(active, "error", error=why, kind="internal")
        if keep_running:
            self._running = None
            self._intake.clear()
            self.stats.running_rows = 0
