"""How a created training job reaches a worker.

The database row is the job's truth (status, events, result); the queue only carries job ids to workers.
Production: arq over Redis to `prefixserve worker` processes. Embedded default: an in-process worker thread.
"""

from __future__ import annotations

from typing import Protocol


class JobQueue(Protocol):
    """Hands job ids to workers. `enqueue` must not block on training; it may raise QueueUnavailable."""

    async def enqueue(self, job_id: str) -> None: ...

    async def close(self) -> None: ...


class QueueUnavailable(Exception):
    """The queue's backing service (Redis) cannot be reached; the job stays `queued` for recovery to retry."""
