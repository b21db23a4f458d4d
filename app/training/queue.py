"""How a created training job reaches a worker.

The database row is the job's truth (status, events, result); the queue only carries job ids to workers.
Production: arq over Redis to `prefixserve worker` processes (app.training.arq_queue). Embedded default: an
in-process worker thread (app.training.inprocess). `open_job_queue` picks one from the settings.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from app.runtime import Runtime

log = logging.getLogger(__name__)


class JobQueue(Protocol):
    """Hands job ids to workers. `enqueue` must not block on training; it may raise QueueUnavailable."""

    async def enqueue(self, job_id: str) -> None: ...

    async def close(self) -> None: ...


class RecoveringQueue(JobQueue, Protocol):
    """A queue the recovery sweep can repair: `ensure_queued` makes sure the queue carries a job the database
    says is queued: enqueue it unless it is waiting or being picked up; `replace_claim` (for a job the sweep
    just re-queued because its worker died) also discards the dead worker's claim on the queue message."""

    async def ensure_queued(self, job_id: str, *, replace_claim: bool = False) -> None: ...


class QueueUnavailable(Exception):
    """The queue's backing service (Redis) cannot be reached; the job stays `queued` for recovery to retry."""


def open_job_queue(runtime: Runtime) -> JobQueue | None:
    """The queue the settings ask for; the in-process worker is started here (it needs the loaded model).
    None (`job_queue = none`, or no model to train with): this process runs no jobs, and created jobs stay
    `queued` in the database until a worker's recovery sweep (every `job_sweep_interval_s`) picks them up."""
    kind = runtime.settings.resolved_job_queue
    if kind == "arq":
        from app.training.arq_queue import ArqJobQueue

        url = runtime.settings.redis_url
        if url is None:  # Settings refuses job_queue=arq without a Redis URL; auto picks arq only with one
            raise ValueError("the arq job queue needs PREFIXSERVE_REDIS_URL")
        return ArqJobQueue(url)
    if kind == "inprocess" and runtime.model is not None:
        from app.training.inprocess import InProcessJobQueue
        from app.training.jobs import JobContext

        gate = runtime.schema_gate
        queue = InProcessJobQueue(JobContext.from_runtime(runtime),
                                  schema_ready=None if gate is None else lambda: gate.check().ok)
        queue.start()
        return queue
    if kind == "inprocess":
        log.warning("no model loaded: the in-process training worker is not started")
    return None
