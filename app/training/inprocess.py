"""The embedded default's job queue: one daemon thread in the server process runs jobs one at a time.

It trains with the server's own LoadedModel while the engine thread serves requests with the same frozen
model: the trainer never changes module state, and grad mode is thread-local (the engine runs under inference
mode). The thread also runs the recovery sweep at start and every `job_sweep_interval_s`, which picks up jobs
left queued by a restart, jobs re-queued after a dead worker, and jobs that other processes (e.g. replicas
with `job_queue = none`) created in a shared database.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable

from app.jobs.recovery import sweep
from app.threads import run_in_own_thread
from app.training.jobs import JobContext, execute_job

log = logging.getLogger(__name__)


class InProcessJobQueue:
    """JobQueue (and RecoveringQueue) run by a worker thread of this process."""

    def __init__(self, ctx: JobContext, *, stop_timeout_s: float = 30.0,
                 schema_ready: Callable[[], bool] | None = None, on_stop: Callable[[], None] | None = None) -> None:
        self.ctx = ctx
        self._on_stop = on_stop  # e.g. closes the worker's own database connections once the thread has ended
        # While it says no (the shared database not migrated yet), sweeps are skipped: they would only fail on
        # missing tables, and no job can be created meanwhile (the API answers 503).
        self.schema_ready = schema_ready
        self.stop_timeout_s = stop_timeout_s
        self._pending: queue.Queue[str | None] = queue.Queue()
        self._ids: set[str] = set()  # queued here and not yet started: enqueueing twice is a no-op
        self._lock = threading.Lock()
        self._interrupt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training-worker", daemon=True)
        self._next_sweep = 0.0
        self.current: str | None = None

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def put(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._ids or job_id == self.current:
                return
            self._ids.add(job_id)
        self._pending.put(job_id)

    async def enqueue(self, job_id: str) -> None:
        self.put(job_id)

    async def ensure_queued(self, job_id: str, *, replace_claim: bool = False) -> None:
        self.put(job_id)

    async def close(self) -> None:
        await asyncio.to_thread(self.stop)

    def stop(self) -> None:
        """Interrupt the running job (it is handed back as `queued`) and end the thread."""
        self._interrupt.set()
        self._pending.put(None)
        if self._thread.is_alive():
            self._thread.join(self.stop_timeout_s)
            if self._thread.is_alive():
                log.warning("the training worker thread did not stop within %.0f s", self.stop_timeout_s)
                return
        if self._on_stop is not None:
            self._on_stop()

    def _run(self) -> None:
        log.info("in-process training worker started")
        while not self._interrupt.is_set():
            self._sweep_if_due()
            try:
                job_id = self._pending.get(timeout=max(0.05, self._next_sweep - time.monotonic()))
            except queue.Empty:
                continue
            if job_id is None:
                break
            with self._lock:
                self._ids.discard(job_id)
                self.current = job_id
            try:
                # On a thread of its own that ends with the job: the OpenMP pool its training starts must not
                # outlive it, or the engine's decode steps stay ~10% slower (app/threads.py).
                run_in_own_thread(functools.partial(execute_job, job_id, ctx=self.ctx, interrupt=self._interrupt,
                                                    timeout_s=self.ctx.settings.job_timeout_s), name="training-job")
            except Exception:
                # The database was unreachable at claim time: the job stays queued; the sweep retries it.
                log.exception("training job %s could not be run", job_id)
            finally:
                self.current = None
        log.info("in-process training worker stopped")

    def _sweep_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        s = self.ctx.settings
        self._next_sweep = now + s.job_sweep_interval_s
        if self.schema_ready is not None and not self.schema_ready():
            log.debug("recovery sweep skipped: the database schema is not at this build's revision")
            return
        try:
            found = sweep(self.ctx.sessions, stale_after_s=s.job_stale_after_s, max_attempts=s.job_max_attempts)
        except Exception:
            log.exception("recovery sweep failed")
            return
        for job_id in found.queued:
            self.put(job_id)
