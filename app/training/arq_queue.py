"""The production job queue: arq (a maintained Redis job queue) carries job ids to `prefixserve worker`s.

One arq job per training job, with the training job's id as the arq job id, so enqueueing twice is a no-op
while the first is waiting. Job arguments are JSON (never pickle: whoever can write Redis must not be able to
run code in a worker). The pool is opened lazily, on the event loop that first enqueues, so the server starts
while Redis is down and its jobs are picked up by the recovery sweep later.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any, Final

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from redis.exceptions import RedisError

from app.jobs.queue import QueueUnavailable

log = logging.getLogger(__name__)

QUEUE_NAME: Final = "prefixserve:training"
FUNCTION: Final = "run_training_job"


def job_serializer(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def job_deserializer(data: bytes) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(data)
    return out


def redis_settings(url: str, *, conn_timeout: int = 2, conn_retries: int = 0) -> RedisSettings:
    """arq's connection settings for a redis:// URL; no retries by default (an enqueue must not hang)."""
    return dataclasses.replace(RedisSettings.from_dsn(url), conn_timeout=conn_timeout, conn_retries=conn_retries)


async def open_pool(url: str) -> ArqRedis:
    return await create_pool(redis_settings(url), default_queue_name=QUEUE_NAME, job_serializer=job_serializer,
                             job_deserializer=job_deserializer)


class ArqJobQueue:
    """JobQueue over arq. `pool`: an open ArqRedis (the worker passes its own); else opened on first use."""

    def __init__(self, redis_url: str | None = None, *, pool: ArqRedis | None = None) -> None:
        if redis_url is None and pool is None:
            raise ValueError("ArqJobQueue needs a Redis URL or a pool")
        self._url = redis_url
        self._pool = pool
        self._owns_pool = pool is None
        self._lock = asyncio.Lock()

    async def _get_pool(self) -> ArqRedis:
        async with self._lock:
            if self._pool is None:
                assert self._url is not None
                self._pool = await open_pool(self._url)
            return self._pool

    async def enqueue(self, job_id: str) -> None:
        try:
            pool = await self._get_pool()
            job = await pool.enqueue_job(FUNCTION, job_id, _job_id=job_id, _queue_name=QUEUE_NAME)
        except (TimeoutError, RedisError, OSError) as exc:
            raise QueueUnavailable(f"cannot reach Redis to enqueue job {job_id}: {exc}") from exc
        if job is None:
            log.debug("job %s is already in the arq queue", job_id)

    async def ensure_queued(self, job_id: str, *, replace_claim: bool = False) -> None:
        """Leave a job that is waiting in the queue, or that a worker is picking up, alone; otherwise clear what
        arq holds for it (a finished message, an old result) and enqueue it afresh. `replace_claim`: the
        worker holding arq's in-progress claim is dead (the sweep saw its heartbeat go stale), so clear the
        claim too; without it arq would keep the message for the whole job timeout. Running twice is safe:
        the database claim lets only one worker run the job."""
        try:
            pool = await self._get_pool()
            async with pool.pipeline(transaction=False) as pipe:
                pipe.exists(job_key_prefix + job_id)
                pipe.exists(in_progress_key_prefix + job_id)
                pipe.zscore(QUEUE_NAME, job_id)
                has_job, in_progress, score = await pipe.execute()
            if has_job and score is not None and (not in_progress or not replace_claim):
                return
            keys = (job_key_prefix, in_progress_key_prefix, retry_key_prefix, result_key_prefix)
            async with pool.pipeline(transaction=True) as pipe:
                pipe.delete(*(k + job_id for k in keys))
                pipe.zrem(QUEUE_NAME, job_id)
                await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            raise QueueUnavailable(f"cannot reach Redis to re-enqueue job {job_id}: {exc}") from exc
        log.info("job %s re-enqueued", job_id)
        await self.enqueue(job_id)

    async def close(self) -> None:
        if self._pool is not None and self._owns_pool:
            await self._pool.aclose()
        self._pool = None
