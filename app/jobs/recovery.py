"""Crash recovery: jobs whose worker died, and queued jobs that no queue carries.

A `running` job whose heartbeat is older than `stale_after_s` lost its worker (killed, machine gone): the sweep
re-queues it while it has attempts left, else fails it (`worker_lost`); nothing was published, because a
version is only ever published in the transaction that marks the job succeeded. Each change is one conditional
UPDATE on the stale heartbeat it saw, so a worker that beats in the meantime keeps its job, and two sweeps on
two workers never both act on one job.

The sweep also returns every `queued` job: the caller makes sure its queue carries each (an enqueue that failed
while Redis was down, a server restarted with jobs in its in-process queue, a job re-queued just now).
Workers run it at start-up and every `job_sweep_interval_s`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import TrainingJob, utcnow
from app.jobs.lease import JobError, add_event, cancel_if_requested, updated

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)  # every queued job after the sweep, oldest first


def _last_sign_of_life() -> sa.ColumnElement[datetime]:
    return sa.func.coalesce(TrainingJob.heartbeat_at, TrainingJob.started_at, TrainingJob.created_at)


def sweep(sessions: sessionmaker[Session], *, stale_after_s: float, max_attempts: int,
          now: datetime | None = None) -> SweepResult:
    """Re-queue or fail stale running jobs, finish queued jobs whose cancel was requested, fail jobs stuck in
    validation, list queued jobs."""
    cutoff = (now or utcnow()) - timedelta(seconds=stale_after_s)
    out = SweepResult()
    with sessions() as session:
        stale = session.execute(
            sa.select(TrainingJob.id, TrainingJob.attempts, TrainingJob.cancel_requested)
            .where(TrainingJob.status == "running", _last_sign_of_life() < cutoff)
        ).all()
        session.rollback()
        for job_id, attempts, cancel in stale:
            _recover(session, job_id, attempts, cancel, cutoff, stale_after_s, max_attempts, out)
        _cancel_queued(session, out)
        _fail_stuck_validation(session, cutoff, out)
        out.queued = list(session.execute(
            sa.select(TrainingJob.id).where(TrainingJob.status == "queued").order_by(TrainingJob.created_at)
        ).scalars())
        session.rollback()
    if out.requeued or out.failed or out.cancelled:
        log.warning("recovery sweep: re-queued %s, failed %s, cancelled %s", out.requeued, out.failed, out.cancelled)
    return out


def _recover(session: Session, job_id: str, attempts: int, cancel: bool, cutoff: datetime, stale_after_s: float,
             max_attempts: int, out: SweepResult) -> None:
    lost = f"the worker was lost (no heartbeat for {stale_after_s:g} s)"
    values: dict[str, object]
    if cancel:
        values, bucket = {"status": "cancelled", "finished_at": utcnow()}, out.cancelled
        message, level = f"{lost}; job cancelled as requested", "warn"
    elif attempts < max_attempts:
        values, bucket = {"status": "queued", "heartbeat_at": None}, out.requeued
        message, level = f"{lost}; job re-queued (attempt {attempts} of {max_attempts} failed)", "warn"
    else:
        error = JobError("worker_lost", f"{lost} on all {attempts} attempts")
        values, bucket = {"status": "failed", "finished_at": utcnow(), "error": error.as_json()}, out.failed
        message, level = f"job failed: {error.message}", "error"
    stmt = (
        sa.update(TrainingJob)
        .where(TrainingJob.id == job_id, TrainingJob.status == "running", TrainingJob.attempts == attempts,
               _last_sign_of_life() < cutoff)
        .values(**values)
    )
    if updated(session, stmt) == 1:
        add_event(session, job_id, message, level=level, data={"attempt": attempts})
        bucket.append(job_id)
    session.commit()


def _fail_stuck_validation(session: Session, cutoff: datetime, out: SweepResult) -> None:
    """Jobs left in `validating_files` by an API process that died mid-request (validation takes a request's
    time, so one older than the stale cutoff is orphaned): fail them, or they would hold their suffix and count
    against the tenant's concurrent-job limit forever."""
    ids = list(session.execute(
        sa.select(TrainingJob.id).where(TrainingJob.status == "validating_files", TrainingJob.created_at < cutoff)
    ).scalars())
    for job_id in ids:
        error = JobError("validation_interrupted", "the server stopped while validating this job's files")
        stmt = (
            sa.update(TrainingJob)
            .where(TrainingJob.id == job_id, TrainingJob.status == "validating_files")
            .values(status="failed", finished_at=utcnow(), error=error.as_json())
        )
        if updated(session, stmt) == 1:
            add_event(session, job_id, f"job failed: {error.message}", level="error")
            out.failed.append(job_id)
        session.commit()


def _cancel_queued(session: Session, out: SweepResult) -> None:
    """Queued jobs whose cancel was requested (the API normally finishes these itself)."""
    ids = list(session.execute(
        sa.select(TrainingJob.id).where(TrainingJob.status == "queued", TrainingJob.cancel_requested.is_(True))
    ).scalars())
    for job_id in ids:
        if cancel_if_requested(session, job_id):
            out.cancelled.append(job_id)
