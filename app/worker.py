"""`prefixserve worker`: an arq worker process that runs training jobs, one at a time, on its own model copy.

Start-up opens the database, blob store and cache tier like the server (app.runtime.open_runtime without the
engine) and loads the frozen base model from the settings. Each arq job carries a training job id; the job runs
on a thread (`execute_job`) so the event loop keeps arq's health check and the recovery sweep going. The sweep
runs at start-up and every `job_sweep_interval_s` whether or not a job is running: it re-queues (or fails)
jobs whose worker died and re-enqueues queued jobs that Redis lost or never received.

Shutdown (SIGTERM/SIGINT): arq cancels the running job; the training thread is interrupted at its next step and
hands the job back as `queued` (arq keeps its message, so another worker picks it up).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from arq.worker import Worker, async_check_health, func

from app.config import Settings
from app.jobs.queue import QueueUnavailable
from app.jobs.recovery import sweep
from app.runtime import Runtime, job_context, load_base_model, open_runtime
from app.training.arq_queue import (
    FUNCTION,
    QUEUE_NAME,
    ArqJobQueue,
    job_deserializer,
    job_serializer,
    redis_settings,
)
from app.training.jobs import JobContext, Outcome, execute_job

log = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL_S = 10
STOP_GRACE_S = 60.0  # how long a cancelled job may take to hand itself back before the worker exits anyway


@dataclass
class WorkerState:
    settings: Settings
    runtime: Runtime
    job_ctx: JobContext
    queue: ArqJobQueue
    interrupts: set[threading.Event] = field(default_factory=set)
    sweeper: asyncio.Task[None] | None = None


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    runtime = await asyncio.to_thread(open_runtime, settings, load_model=False)
    loaded = await asyncio.to_thread(load_base_model, settings,
                                     torch_threads=settings.training_torch_threads or settings.torch_threads)
    # No resolver without a model: invalidations go to runtime.cache, the Redis tier, which reaches every replica.
    job_ctx = job_context(runtime, loaded=loaded)
    state = WorkerState(settings, runtime, job_ctx, ArqJobQueue(pool=ctx["redis"]))
    state.sweeper = asyncio.create_task(_sweep_forever(state), name="recovery-sweep")
    ctx["prefixserve"] = state
    log.info("training worker ready: model %s on %s", loaded.spec.model_id, loaded.device)


async def shutdown(ctx: dict[str, Any]) -> None:
    state: WorkerState | None = ctx.get("prefixserve")
    if state is None:
        return
    for interrupt in state.interrupts:
        interrupt.set()
    if state.sweeper is not None:
        state.sweeper.cancel()
    await asyncio.to_thread(state.runtime.close)
    log.info("training worker stopped")


async def run_training_job(ctx: dict[str, Any], job_id: str) -> Outcome:
    """The arq function: run the job on a thread; on cancellation (shutdown, arq's timeout) interrupt it and
    wait, within STOP_GRACE_S, for it to hand the job back."""
    state: WorkerState = ctx["prefixserve"]
    interrupt = threading.Event()
    state.interrupts.add(interrupt)
    running = asyncio.ensure_future(asyncio.to_thread(
        execute_job, job_id, ctx=state.job_ctx, interrupt=interrupt, timeout_s=state.settings.job_timeout_s))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        interrupt.set()
        await asyncio.wait({running}, timeout=STOP_GRACE_S)
        raise
    finally:
        state.interrupts.discard(interrupt)


async def _sweep_forever(state: WorkerState) -> None:
    s = state.settings
    gate = state.runtime.schema_gate
    while True:
        # Not on a schema behind this build (a replica with PREFIXSERVE_MIGRATE_ON_START, or `prefixserve
        # migrate`, has yet to run): the sweep would only fail on missing tables.
        if gate is not None and not (await asyncio.to_thread(gate.check)).ok:
            log.debug("recovery sweep skipped: %s", gate.state.message)
            await asyncio.sleep(s.job_sweep_interval_s)
            continue
        try:
            found = await asyncio.to_thread(sweep, state.runtime.sessions, stale_after_s=s.job_stale_after_s,
                                            max_attempts=s.job_max_attempts)
            for job_id in found.queued:
                await state.queue.ensure_queued(job_id, replace_claim=job_id in found.requeued)
        except QueueUnavailable as exc:
            log.warning("recovery sweep: Redis unavailable: %s", exc)
        except Exception:
            log.exception("recovery sweep failed")
        await asyncio.sleep(s.job_sweep_interval_s)


def build_worker(settings: Settings, *, burst: bool = False) -> Worker:
    """The arq Worker for `settings` (needs PREFIXSERVE_REDIS_URL)."""
    if not settings.redis_url:
        raise ValueError("prefixserve worker needs PREFIXSERVE_REDIS_URL (the embedded default trains in the server)")
    return Worker(
        # keep_result=0: a finished job leaves no result key, so the same job id can be enqueued again after
        # a re-queue; max_tries is generous because the database, not arq, decides when a job has failed.
        functions=[func(run_training_job, name=FUNCTION, keep_result=0, max_tries=100,
                        timeout=settings.job_timeout_s + STOP_GRACE_S)],
        queue_name=QUEUE_NAME,
        redis_settings=redis_settings(settings.redis_url, conn_retries=5),
        on_startup=startup,
        on_shutdown=shutdown,
        ctx={"settings": settings},
        max_jobs=1,
        burst=burst,
        poll_delay=0.5,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        job_serializer=job_serializer,
        job_deserializer=job_deserializer,
    )


def check_health(settings: Settings) -> bool:
    """Whether a worker on this Redis refreshed its health key within HEALTH_CHECK_INTERVAL_S."""
    if not settings.redis_url:
        return False
    return asyncio.run(async_check_health(redis_settings(settings.redis_url), queue_name=QUEUE_NAME)) == 0
