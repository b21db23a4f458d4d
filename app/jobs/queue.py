"""How a created training job reaches a worker.

The database row is the job's truth (status, events, result); the queue only carries job ids to workers.
Production: arq over Redis to `prefixserve worker` processes (app.training.arq_queue). Embedded default: an
in-process worker thread (app.training.inprocess). The composition root (app/runtime.py `open_job_queue`)
picks one from the settings.
"""

from __future__ import annotations

import logging
from typing import Protocol

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
