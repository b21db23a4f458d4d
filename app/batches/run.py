"""Running one claimed batch: its requests at batch priority, bounded, recorded in chunks, until it ends.

Requests start in input order, at most the runner's concurrency at a time (shared by all its batches). Each
answered request goes to a buffer; a heartbeat task writes the buffer (fenced on the claim, app/batches/store.py)
when it holds `chunk` results and at least every `heartbeat_s`, and reads back the batch's status: a cancel
(`cancelling`), the end of its completion window, or a lost claim halts the run at once (requests in flight are
cancelled in the engine). A request that fails for a passing reason (app/services/batch_lines.py `Transient`)
is tried again after a back-off, up to `max_attempts` times; the tenant's tokens_per_minute pauses its batch's new
requests (before they take one of the runner's slots) while the minute's tokens are spent, and the tokens each
request generates are counted there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, TypeVar

from sqlalchemy.orm import Session

from app.batches import output, store
from app.batches.store import Claim
from app.config import Settings
from app.engine.protocol import EngineClientProtocol
from app.errors import RateLimited
from app.services import limits
from app.services.access import Access
from app.services.auth import Principal
from app.services.batch_input import BatchLine, parse_batch_input
from app.services.batch_lines import LineOutcome, Transient, run_line
from app.services.db_calls import DbCalls
from app.services.limit_store import CounterStore
from app.services.limits import Limits
from app.services.stacks import StackLimits
from prefix_store.blobs import BlobStore

log = logging.getLogger(__name__)

T = TypeVar("T")

Halt = Literal["cancelled", "expired", "lost", "stopped"]


@dataclass(frozen=True)
class Pace:
    """How a runner paces its batches."""

    concurrency: int = 16  # requests in flight in this process, all batches together
    heartbeat_s: float = 2.0  # the longest a finished request waits to be recorded; the claim's heartbeat
    chunk: int = 32  # finished requests recorded in one transaction
    max_attempts: int = 5  # tries of a request that keeps failing for a passing reason
    retry_base_s: float = 1.0  # back-off after a failed try: base, 2 x base, 4 x base, ...


class Host(Protocol):
    """What a run uses of its runner (app/batches/runner.py BatchRunner)."""

    settings: Settings
    db_calls: DbCalls
    blobs: BlobStore
    engine: EngineClientProtocol
    pace: Pace
    slots: asyncio.Semaphore  # the runner's request slots, shared by its batches
    clock: Callable[[], datetime]

    def served_fingerprint(self) -> str | None: ...

    async def db(self, fn: Callable[[Session], T]) -> T: ...

    async def count(self, fn: Callable[[CounterStore], T]) -> T: ...


class BatchRun:
    """One claimed batch, run until it completes, is cancelled, expires, is lost, or the server stops."""

    def __init__(self, claim: Claim, runner: Host) -> None:
        self.claim = claim
        self.runner = runner
        self._halt = asyncio.Event()
        self._why: Halt | None = None
        self._poke = asyncio.Event()  # write the buffer (and look at the batch's status) now
        self._buffer: list[LineOutcome] = []
        self._recorded: set[int] = set()
        self._fingerprint = ""  # the served base model's, read when the run starts
        self._beats_done = False

    def halt(self, why: Halt) -> None:
        if self._why is None:
            self._why = why
        self._halt.set()

    def poke(self) -> None:
        self._poke.set()

    def _expired(self, expires_at: datetime) -> bool:
        return self.runner.clock() >= expires_at

    async def run(self) -> None:
        try:
            await self._run()
        except Exception:  # the database or the blob store failed: hand the batch back to whoever claims it
            log.exception("batch %s: the run failed; handing the batch back", self.claim.batch_id)
            with contextlib.suppress(Exception):
                await self.runner.db(lambda s: store.release(s, self.claim))

    async def _run(self) -> None:
        c = self.claim
        if c.status == "cancelling":
            await self._finish("cancelled")
            return
        if c.status == "finalizing":
            await self._finish("completed")
            return
        fingerprint = self.runner.served_fingerprint()
        if fingerprint is None:  # the model is not loaded (yet): leave the batch to a runner that serves one
            await self.runner.db(lambda s: store.release(s, c))
            return
        self._fingerprint = fingerprint
        lines = await asyncio.to_thread(self._read_input)
        done = await self.runner.db(lambda s: store.done_lines(s, c.batch_id))
        tenant_limits = await self.runner.db(lambda s: limits.effective_limits(
            session=s, settings=self.runner.settings, tenant_id=c.tenant_id))
        pending = [line for line in lines if line.line not in done]
        if self._expired(c.expires_at):
            self.halt("expired")
        else:
            log.info("batch %s: running %d of its %d requests", c.batch_id, len(pending), len(lines))
            await self._run_lines(pending, tenant_limits)
        why = self._why
        if why == "stopped":
            await self.runner.db(lambda s: store.release(s, c))
        if why in ("lost", "stopped"):
            return
        if why is None and not await self.runner.db(lambda s: output.start_finalizing(s, c)):
            return  # lost while finishing
        unfinished = [(line.line, line.custom_id) for line in pending if line.line not in self._recorded]
        await self._finish("cancelled" if why == "cancelled" else "expired" if why == "expired" else "completed",
                           unfinished)

    def _read_input(self) -> list[BatchLine]:
        data = self.runner.blobs.get(self.claim.input_sha256)
        lines, errors = parse_batch_input(data, endpoint=self.claim.endpoint, max_lines=len(data) + 1)
        if errors:  # checked when the batch was created; only a changed blob could get here
            raise ValueError(f"batch {self.claim.batch_id}: its input no longer parses: {errors[0].message}")
        return lines

    async def _finish(self, outcome: output.Outcome, unfinished: list[tuple[int, str]] | None = None) -> None:
        blobs, c = self.runner.blobs, self.claim
        await self.runner.db(lambda s: output.finish(s, blobs, c, outcome, unfinished or []))

    # ---- the requests --------------------------------------------------------------------------------------
    async def _run_lines(self, pending: list[BatchLine], tenant_limits: Limits) -> None:
        access = Access(Principal(tenant_id=self.claim.tenant_id, scopes=frozenset({"inference"})),
                        limits=tenant_limits, stacking=StackLimits.of(self.runner.settings))
        beats = asyncio.create_task(self._heartbeats())
        in_flight: set[asyncio.Task[None]] = set()
        try:
            for line in pending:
                if not await self._slot(access):
                    break
                task = asyncio.create_task(self._one(line, access))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                # The slot is given back when the task ends, even one cancelled before it started to run.
                task.add_done_callback(lambda _t: self.runner.slots.release())
            halted = asyncio.create_task(self._halt.wait())
            while in_flight and not self._halt.is_set():
                await asyncio.wait({*in_flight, halted}, return_when=asyncio.FIRST_COMPLETED)
            halted.cancel()
        finally:
            for task in list(in_flight):
                task.cancel()  # their engine requests are cancelled with them
            await asyncio.gather(*in_flight, return_exceptions=True)
            self._beats_done = True  # not cancelled: see _heartbeats
            self.poke()
            await asyncio.gather(beats, return_exceptions=True)
        if self._why != "lost":
            await self._write()

    async def _slot(self, access: Access) -> bool:
        """One of the runner's slots for the batch's next request, taken while the tenant has tokens left this
        minute (waiting for tokens holds no slot: a tenant whose tokens are spent holds up none of another's
        batches); False when the run halts first."""
        while not self._halt.is_set():
            wait = await self._tokens_spent(access)
            if wait is not None:
                await self._pause(wait)
                continue
            if not await self._turn():
                return False
            if await self._tokens_spent(access) is None:  # still true after the wait for the slot
                return True
            self.runner.slots.release()
        return False

    async def _turn(self) -> bool:
        """Wait for one of the runner's request slots; False (no slot taken) when the run halts first."""
        take = asyncio.create_task(self.runner.slots.acquire())
        halted = asyncio.create_task(self._halt.wait())
        await asyncio.wait({take, halted}, return_when=asyncio.FIRST_COMPLETED)
        halted.cancel()
        if not self._halt.is_set():
            return True
        if not take.cancel():  # it got a slot anyway: give it back
            self.runner.slots.release()
        return False

    async def _one(self, line: BatchLine, access: Access) -> None:
        pace, runner = self.runner.pace, self.runner
        for attempt in range(pace.max_attempts):
            if self._halt.is_set():
                return
            try:
                result = await run_line(line, endpoint=self.claim.endpoint, access=access, db_calls=runner.db_calls,
                                        engine=runner.engine, fingerprint=self._fingerprint,
                                        last_try=attempt + 1 == pace.max_attempts)
            except Transient as exc:
                log.info("batch %s line %d: %s; trying again", self.claim.batch_id, line.line, exc)
                await self._pause(pace.retry_base_s * 2**attempt)
                continue
            self._buffer.append(result)
            if len(self._buffer) >= pace.chunk:
                self.poke()
            await self._count_tokens(access, result.completion_tokens)
            return

    async def _count_tokens(self, access: Access, tokens: int) -> None:
        """The request's generated tokens count against the tenant's tokens_per_minute, as an API request's do."""
        await self.runner.count(lambda st: limits.record_tokens(
            store=st, tenant_id=self.claim.tenant_id, limits=access.limits or Limits(), tokens=tokens))

    async def _tokens_spent(self, access: Access) -> float | None:
        """Seconds until the tenant's tokens_per_minute has room again (its interactive requests are refused
        meanwhile); None when it has room now."""
        tenant_limits = access.limits or Limits()
        try:
            await self.runner.count(lambda st: limits.check_token_rate(
                store=st, tenant_id=self.claim.tenant_id, limits=tenant_limits))
        except RateLimited as exc:
            return float((exc.headers or {}).get("Retry-After", "1"))
        return None

    async def _pause(self, seconds: float) -> None:
        """Sleep, cut short when the run halts."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._halt.wait(), seconds)

    # ---- recording -----------------------------------------------------------------------------------------
    async def _heartbeats(self) -> None:
        """Write the buffer at every heartbeat (or when poked) until `_beats_done`. Never cancelled: a write whose
        caller is cancelled still commits on its database thread, and its results would then be written twice."""
        while not self._beats_done:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.runner.pace.heartbeat_s)
            self._poke.clear()
            if self._beats_done:
                return
            try:
                await self._write()
            except Exception as exc:  # the database is down: keep the results, try again at the next beat
                log.warning("batch %s: could not record progress (%s)", self.claim.batch_id, type(exc).__name__)

    async def _write(self) -> None:
        """Record the buffer (or only beat); halt on a cancel, the end of the window, or a lost claim."""
        chunk, self._buffer = self._buffer, []
        try:
            beat = await self.runner.db(lambda s: store.record(s, self.claim, chunk))
        except BaseException:
            self._buffer[:0] = chunk
            raise
        if beat is None:
            log.warning("batch %s: another runner holds it now; stopping here", self.claim.batch_id)
            self.halt("lost")
            return
        self._recorded.update(o.line for o in chunk)
        if beat.status == "cancelling":
            self.halt("cancelled")
        elif self._expired(beat.expires_at):
            self.halt("expired")
