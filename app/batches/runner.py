"""The batch runner: an asyncio task in each API server process that serves the model, where the engine is.

It claims unfinished batches from the database (app/batches/store.py: a conditional UPDATE gives it a lease on
each, so with several replicas every batch runs in one place) and runs each (app/batches/run.py), at most
`MAX_BATCHES` at a time and `pace.concurrency` requests in flight over all of them. It looks for batches when it
starts, when this process creates or cancels one (`wake`), when one of its batches ends, and every `poll_s`
(batches created on other replicas, and batches whose runner died: its heartbeat goes stale after
`stale_after_s` and the batch is claimed again, resuming after its last recorded request). Its database calls go
through the request path's bounded `DbCalls`, one short session each, never held across a generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Final, TypeVar

from sqlalchemy.orm import Session

from app.batches import store
from app.batches.run import BatchRun, Pace
from app.config import Settings
from app.db.models import utcnow
from app.engine.protocol import EngineClientProtocol
from app.services.db_calls import DbCalls
from app.services.limit_store import CounterStore
from prefix_store.blobs import BlobStore

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BATCHES: Final = 4  # batches one process runs at once (their requests share `pace.concurrency`)


class BatchRunner:
    """Claims and runs batches until `stop`. Built by the composition root (app/runtime.py)."""

    def __init__(self, *, settings: Settings, db_calls: DbCalls, blobs: BlobStore, engine: EngineClientProtocol,
                 counters: CounterStore, fingerprint: Callable[[], str | None], pace: Pace | None = None,
                 schema_ready: Callable[[], bool] | None = None, poll_s: float | None = None,
                 stale_after_s: float | None = None, clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self.db_calls = db_calls
        self.blobs = blobs
        self.engine = engine
        self.counters = counters
        # The served base model's fingerprint (None while no model is loaded): a prefix version made for another
        # base model is refused, as the API refuses it. Public: the HTTP tests' fake engine names its own.
        self.fingerprint = fingerprint
        self.pace = pace or Pace(concurrency=settings.batch_concurrency, heartbeat_s=settings.job_heartbeat_s)
        self.schema_ready = schema_ready
        self.poll_s = poll_s if poll_s is not None else settings.job_sweep_interval_s
        self.stale_after_s = stale_after_s if stale_after_s is not None else settings.job_stale_after_s
        self.clock = clock
        self.slots = asyncio.Semaphore(self.pace.concurrency)
        self._wake = asyncio.Event()
        self._runs: dict[str, tuple[BatchRun, asyncio.Task[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # ---- what the rest of the process calls -----------------------------------------------------------------
    async def start(self) -> None:
        """On the serving event loop (the app's lifespan): a first look for batches (those a stopped or dead
        server left), before the app serves, then the loop in the background."""
        await self._look()
        self._task = asyncio.create_task(self._main(), name="batch-runner")

    def wake(self) -> None:
        """Look for batches now, and let running ones look at their status (a cancel) now."""
        self._wake.set()
        for run, _ in self._runs.values():
            run.poke()

    @property
    def running(self) -> list[str]:
        """The ids of the batches this runner holds."""
        return list(self._runs)

    async def stop(self) -> None:
        """Stop claiming; each running batch cancels its requests in flight, records what finished and is handed
        back (any runner may claim it at once)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:  # not cancelled: a claim cancelled mid-call would still commit, unreleased
            await asyncio.gather(self._task, return_exceptions=True)
        runs = list(self._runs.values())
        for run, _ in runs:
            run.halt("stopped")
        await asyncio.gather(*(task for _, task in runs), return_exceptions=True)

    # ---- helpers the runs use --------------------------------------------------------------------------------
    def served_fingerprint(self) -> str | None:
        return self.fingerprint()

    async def db(self, fn: Callable[[Session], T]) -> T:
        return await self.db_calls.run(fn)

    async def count(self, fn: Callable[[CounterStore], T]) -> T:
        """A rate-counter operation: Redis calls (sub-second socket timeouts) on a thread, in-process ones inline."""
        if self.counters.shared:
            return await asyncio.to_thread(fn, self.counters)
        return fn(self.counters)

    # ---- the loop ----------------------------------------------------------------------------------------------
    async def _main(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()
            if not self._stopping:
                await self._look()

    async def _look(self) -> None:
        try:
            await self._claim()
        except Exception as exc:  # the database is down or busy: look again at the next wake or poll
            log.warning("batch runner: could not look for batches (%s: %s)", type(exc).__name__, exc)

    async def _claim(self) -> None:
        free = MAX_BATCHES - len(self._runs)
        if free <= 0 or self.fingerprint() is None:
            return
        if self.schema_ready is not None and not self.schema_ready():
            return  # a database not migrated to this build yet has no batches table
        held = list(self._runs)
        claims = await self.db(lambda s: store.claim(s, limit=free, stale_after_s=self.stale_after_s, skip=held,
                                                     now=self.clock()))
        for claim in claims:
            if self._stopping:  # claimed while stopping: hand it straight back
                await self.db(lambda s, c=claim: store.release(s, c))  # type: ignore[misc]
                continue
            run = BatchRun(claim, self)
            task = asyncio.create_task(run.run(), name=f"batch-{claim.batch_id}")
            self._runs[claim.batch_id] = (run, task)
            task.add_done_callback(lambda _t, batch_id=claim.batch_id: self._ended(batch_id))  # type: ignore[misc]

    def _ended(self, batch_id: str) -> None:
        self._runs.pop(batch_id, None)
        if not self._stopping:
            self._wake.set()  # room for another batch
