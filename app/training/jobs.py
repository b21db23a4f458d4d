"""Running one training job: claim it, train, publish the prefix atomically or record why not.

`execute_job` is what every worker calls (the arq worker, the in-process worker thread, `prefixserve train`
without a server). The database row is the truth: a job is claimed with one conditional UPDATE, every later
write is fenced on the attempt (app.jobs.lease), and the result is published in ONE transaction that
inserts the PrefixVersion and marks the job succeeded; the blob is written before that transaction and
collected again if it does not commit. A worker that dies mid-job therefore never leaves a half-trained prefix
published: the recovery sweep (app.jobs.recovery) re-queues or fails the job.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.catalog.versions import publish_version
from app.config import Settings
from app.db.models import PERSONAL_PREFIX_PREFIX, PrefixVersion, TrainingJob
from app.errors import ServiceError
from app.jobs.job_config import config_from_job, on_top_of_label
from app.jobs.lease import JobError, JobLease, JobLost, claim
from app.jobs.types import (
    TokenizedExample,
    TrainCallbacks,
    TrainConfig,
    TrainingCancelled,
    TrainingDataError,
    TrainingDiverged,
    TrainResult,
)
from app.training.batches import validation_size
from app.training.job_inputs import (
    JobData,
    JobFailed,
    load_base,
    load_job_data,
    load_resume_point,
    load_warm_start,
)
from app.training.progress import Heartbeat, JobReporter, StopCause, storable
from prefix_store.blobs import BlobStore

if TYPE_CHECKING:
    from app.engine.model import LoadedModel
    from app.training.train_state import TrainState
    from prefix_store.types import PrefixKV, PrefixTensors

log = logging.getLogger(__name__)

# What a lost database connection raises: an outage, not a failure of the job.
DATABASE_DOWN = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)
OUTAGE_RETRY_S = 1.0

Outcome = Literal["succeeded", "failed", "cancelled", "requeued", "lost", "skipped"]


TrainFunction = Callable[..., TrainResult]  # app.training.trainer.train_prefix's signature


def _default_train(
    loaded: LoadedModel, train: Sequence[TokenizedExample], val: Sequence[TokenizedExample] | None,
    config: TrainConfig, *, init: PrefixTensors | None = None, callbacks: TrainCallbacks | None = None,
    resume: TrainState | None = None, base: PrefixKV | None = None,
) -> TrainResult:
    from app.training.trainer import train_prefix  # torch: app/training's job modules stay torch-free at import

    return train_prefix(loaded, train, val, config, init=init, callbacks=callbacks, resume=resume, base=base)


@dataclass(frozen=True)
class JobContext:
    """What running a job needs: the stores, the frozen model, settings, and the train function (tests may
    inject one; default app.training.trainer.train_prefix)."""

    sessions: sessionmaker[Session]
    blobs: BlobStore
    loaded: LoadedModel
    settings: Settings
    # Frees a prefix from the cache tiers on every replica (tenant_id, prefix_id); see _publish.
    invalidate: Callable[[str, str], None] = lambda _t, _p: None
    train: TrainFunction = field(default=_default_train)


def execute_job(job_id: str, *, ctx: JobContext, interrupt: threading.Event | None = None,
                timeout_s: float | None = None) -> Outcome:
    """Run job `job_id` to its end on this thread, if it can be claimed.

    interrupt: set by the worker when it shuts down; the job is handed back (`queued`) for another attempt.
    timeout_s: the job fails (code `timeout`) after this long. Returns what happened; never raises for a
    job's own failure (that is recorded on the job), only for an unreachable database at claim time.
    """
    lease = claim(ctx.sessions, job_id)
    if lease is None:
        log.info("job %s is not claimable (not queued, or cancelled); skipped", job_id)
        return "skipped"
    s = ctx.settings
    deadline = time.monotonic() + timeout_s if timeout_s is not None else None
    heartbeat = Heartbeat(lease, interval_s=s.job_heartbeat_s, interrupt=interrupt, deadline=deadline)
    started = time.monotonic()
    try:
        with heartbeat:
            return _run(lease, heartbeat, ctx, started)
    except JobLost:
        log.warning("job %s: attempt %d lost the job (re-queued elsewhere); its work is discarded", job_id,
                    lease.attempt)
        return "lost"


def _run(lease: JobLease, heartbeat: Heartbeat, ctx: JobContext, started: float) -> Outcome:
    job = lease.job()
    try:
        result = _train(lease, heartbeat, ctx, job)
        if heartbeat.cause in ("cancelled", "lost"):  # came after the last step; a shutdown still publishes
            return _stopped(lease, heartbeat.cause, ctx)
        return _publish(lease, ctx, job, result, time.monotonic() - started)
    except TrainingCancelled:
        return _stopped(lease, heartbeat.cause or "cancelled", ctx)
    except JobLost:
        raise
    except JobFailed as exc:
        return _fail(lease, exc.error)
    except TrainingDataError as exc:
        return _fail(lease, JobError("invalid_training_data", str(exc)))
    except TrainingDiverged as exc:
        return _fail(lease, JobError("training_diverged", str(exc)))
    except ValueError as exc:  # the trainer refuses a configuration or warm-start prefix
        return _fail(lease, JobError("invalid_configuration", str(exc)))
    except DATABASE_DOWN as exc:
        # The database went away mid-attempt (a restart, a fail-over), e.g. while the job read its inputs: not
        # the job's doing, so it gets another attempt instead of failing for good.
        log.warning("job %s: the database went away (%s); handing the job back", lease.job_id, type(exc).__name__)
        return _hand_back_when_the_database_answers(lease, ctx, heartbeat)
    except Exception as exc:
        log.exception("job %s failed with an internal error", lease.job_id)
        return _fail(lease, JobError("internal_error", f"internal error ({type(exc).__name__}): {str(exc)[:300]}"))


def _train(lease: JobLease, heartbeat: Heartbeat, ctx: JobContext, job: TrainingJob) -> TrainResult:
    from app.engine.factory import context_length  # imports torch: this module stays torch-free at import

    config = config_from_job(job)
    s = ctx.settings
    if _personal(job) and job.end_user_id is None:
        raise JobFailed(JobError("end_user_deleted", "the end user was deleted"))
    limits = {"max_virtual_tokens": s.max_virtual_tokens, "max_bytes": s.max_upload_bytes}
    # The frozen base (`on_top_of`) the prefix is trained behind, as the stack base+prefix is served.
    base = load_base(job, sessions=ctx.sessions, blobs=ctx.blobs, loaded=ctx.loaded, **limits)
    base_tokens = base.num_virtual_tokens if base is not None else 0
    data = load_job_data(job, sessions=ctx.sessions, blobs=ctx.blobs, loaded=ctx.loaded,
                         max_tokens=context_length(ctx.loaded) - config.num_virtual_tokens - base_tokens)
    init = load_warm_start(job, sessions=ctx.sessions, blobs=ctx.blobs, loaded=ctx.loaded, **limits)
    # Without a validation file the trainer holds out `validation_split` of the training examples: say so.
    n_val = len(data.val) or validation_size(len(data.train), config.validation_split)
    n_train = len(data.train) - (0 if data.val else n_val)
    total = config.total_steps(n_train)
    lease.event(f"training on {n_train} examples ({n_val} validation), {total} steps",
                data={"examples": n_train, "validation_examples": n_val})
    resume = load_resume_point(job, sessions=ctx.sessions, blobs=ctx.blobs, loaded=ctx.loaded, **limits)
    offset, extra = 0, dict[str, Any]()
    if base is not None:
        extra["base"] = base
    if resume is not None:
        if resume.state is not None and _resumable(resume.state, config, data):
            # The same run from the checkpoint's step on: same optimizer moments, schedule, data order, init.
            extra["resume"] = resume.state
        else:
            # A prefix-only checkpoint (older, or the examples changed): train the steps left from its prefix,
            # with a fresh optimizer and warm-up (at least one step: the result is a prefix of this attempt).
            offset, init = resume.step, resume.prefix
            config = dataclasses.replace(config, max_steps=max(1, total - offset), n_epochs=None)
        lease.event(f"resuming from the checkpoint at step {resume.step} of {total}",
                    data={"resumed_from_step": resume.step, "optimizer_state": "resume" in extra})
    reporter = JobReporter(lease, blobs=ctx.blobs, spec=ctx.loaded.spec, step_offset=offset)
    try:
        result = ctx.train(ctx.loaded, data.train, data.val or None, config, init=init,
                           callbacks=reporter.callbacks(heartbeat), **extra)
    except TrainingCancelled as exc:
        if heartbeat.cause == "interrupted" and exc.prefix is not None:
            # The worker is shutting down: keep what this attempt learnt for the next one.
            reporter.on_checkpoint(exc.step, exc.prefix, {"interrupted": 1.0}, exc.state)
        raise
    loss = result.final_train_loss
    if loss is not None and not math.isfinite(loss):
        raise TrainingDiverged(f"the final training loss is {loss}; lower the learning rate")
    return result


def _resumable(state: TrainState, config: TrainConfig, data: JobData) -> bool:
    from app.training.train_state import run_key  # torch: this module stays torch-free at import

    return state.key == run_key(config, data.train, data.val)


def _personal(job: TrainingJob) -> bool:
    return job.prefix_name.startswith(PERSONAL_PREFIX_PREFIX)


def _publish(lease: JobLease, ctx: JobContext, job: TrainingJob, result: TrainResult, seconds: float) -> Outcome:
    """Blob first, then one transaction: the new PrefixVersion and the job's success (fenced on the lease)."""
    from prefix_store.codec import encode_stored  # torch: this module stays torch-free at import

    spec = ctx.loaded.spec
    config = config_from_job(job)
    kv = storable(result.prefix, spec)
    base = on_top_of_label(job)
    if base is not None:  # the version's own record of what it was trained behind (the catalog reads the job's)
        kv = dataclasses.replace(kv, metadata={**kv.metadata, "on_top_of": base})
    summary = {"steps": result.steps, "trained_tokens": result.trained_tokens, "seconds": round(seconds, 3),
               "stop_reason": result.stop_reason, "final_train_loss": result.final_train_loss,
               "best_val_loss": result.best_val_loss}

    def finalize(session: Session, row: PrefixVersion) -> None:
        lease.mark_succeeded(session, version_id=row.id, trained_tokens=result.trained_tokens,
                             message=f"job succeeded: published {job.prefix_name}@{row.version} after "
                                     f"{result.steps} steps ({result.stop_reason})",
                             data={**summary, "version": row.version})

    try:
        with ctx.sessions() as session:
            prefix, row = publish_version(
                session=session, blobs=ctx.blobs, tenant_id=job.tenant_id, name=job.prefix_name,
                native=encode_stored(kv), end_user_id=job.end_user_id if _personal(job) else None,
                finalize=finalize,
                values={"num_virtual_tokens": kv.num_virtual_tokens, "source_format": "trained", "kind": config.kind,
                        "base_model_fingerprint": spec.fingerprint, "recorded_base_model": None,
                        "training_job_id": job.id},
            )
    except JobLost:
        if lease.cancel_requested():
            return _stopped(lease, "cancelled", ctx)
        raise
    except ServiceError as exc:  # object store down, or the end user deleted while training (FK conflict)
        return _fail(lease, JobError("publish_failed", f"the trained prefix could not be published: {exc}"))
    if prefix.end_user_id is not None:
        # Frees the superseded personal version's device memory on every replica; `user:<id>` now means this one.
        ctx.invalidate(job.tenant_id, prefix.id)
    log.info("job %s published %s@%d (%d steps, %.1f s)", job.id, job.prefix_name, row.version, result.steps,
             seconds)
    return "succeeded"


def _stopped(lease: JobLease, cause: StopCause, ctx: JobContext) -> Outcome:
    if cause == "lost":
        raise JobLost(lease.job_id)
    if cause == "cancelled":
        lease.finish("cancelled", "job cancelled; nothing was published")
        return "cancelled"
    if cause == "timeout":
        return _fail(lease, JobError("timeout", f"the job ran longer than {ctx.settings.job_timeout_s} s"))
    return _hand_back(lease, ctx, "the worker is shutting down", "its workers shut down")


def _hand_back(lease: JobLease, ctx: JobContext, why: str, why_all: str) -> Outcome:
    """Re-queue the job for another attempt, or fail it once it has had `job_max_attempts`."""
    if lease.attempt >= ctx.settings.job_max_attempts:
        return _fail(lease, JobError("interrupted", f"the job was interrupted {lease.attempt} times ({why_all})"))
    lease.finish("queued", f"{why}; job re-queued", level="warn")
    return "requeued"


def _hand_back_when_the_database_answers(lease: JobLease, ctx: JobContext, heartbeat: Heartbeat) -> Outcome:
    """Hand the job back as soon as the database takes the write, trying every OUTAGE_RETRY_S. Past the point
    where the job's heartbeat counts as stale the recovery sweep does it instead (the error is raised)."""
    deadline = time.monotonic() + ctx.settings.job_stale_after_s
    while True:
        try:
            return _hand_back(lease, ctx, "the database went away during the attempt", "database outages")
        except DATABASE_DOWN:
            if time.monotonic() >= deadline or heartbeat.cause is not None:
                raise
            time.sleep(OUTAGE_RETRY_S)


def _fail(lease: JobLease, error: JobError) -> Outcome:
    log.info("job %s failed: %s: %s", lease.job_id, error.code, error.message)
    lease.finish("failed", f"job failed: {error.message}", error=error, level="error", data={"code": error.code})
    return "failed"
