"""One worker's hold on one training job attempt: the claim and every later write, fenced on the attempt.

The database row is the job's truth. A worker claims a `queued` job with one conditional UPDATE (so two
workers never both run it), which bumps `attempts`; from then on every write the worker makes is conditional on
`status = 'running' AND attempts = <its attempt>`. When the recovery sweep has re-queued the job because the
heartbeat went stale (and maybe another worker claimed it since), the old worker's writes match no row: it
cannot publish, finish or overwrite anything of the newer attempt, it only learns that it lost the job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import JobCheckpoint, JobEvent, TrainingJob, utcnow

log = logging.getLogger(__name__)


class JobLost(Exception):
    """The attempt no longer owns its job (re-queued after a stale heartbeat, or finished by someone else)."""


@dataclass(frozen=True)
class JobError:
    """Why a job failed, as stored in `training_jobs.error` (OpenAI's {code, message, param})."""

    code: str
    message: str
    param: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param}


def updated(session: Session, stmt: sa.Update) -> int:
    """Run an UPDATE and return how many rows it matched."""
    result = cast("sa.CursorResult[Any]", session.execute(stmt))
    return int(result.rowcount)


def add_event(session: Session, job_id: str, message: str, *, level: str = "info",
              data: dict[str, Any] | None = None) -> None:
    """Add a line to the job's event log (in the caller's transaction)."""
    session.add(JobEvent(job_id=job_id, level=level, message=message, data=data))


def claim(sessions: sessionmaker[Session], job_id: str) -> JobLease | None:
    """Claim a `queued` job for this worker: status running, attempts + 1, heartbeat now. None when the job is
    not claimable (running elsewhere, finished, missing); a queued job whose cancel was requested is finished
    as cancelled here."""
    now = utcnow()
    with sessions() as session:
        claimed = updated(session, (
            sa.update(TrainingJob)
            .where(TrainingJob.id == job_id, TrainingJob.status == "queued", TrainingJob.cancel_requested.is_(False))
            # started_at: the first attempt's (a resumed job has been training since then)
            .values(status="running", attempts=TrainingJob.attempts + 1,
                    started_at=sa.func.coalesce(TrainingJob.started_at, now), heartbeat_at=now,
                    finished_at=None, error=None)
        ))
        if claimed != 1:
            session.rollback()
            cancel_if_requested(session, job_id)
            return None
        attempt = session.execute(sa.select(TrainingJob.attempts).where(TrainingJob.id == job_id)).scalar_one()
        add_event(session, job_id, f"job started (attempt {attempt})", data={"attempt": attempt})
        session.commit()
    return JobLease(sessions, job_id, attempt)


def cancel_if_requested(session: Session, job_id: str) -> bool:
    """Finish a queued job whose cancel was requested as cancelled (and commit); whether it did."""
    done = updated(session, (
        sa.update(TrainingJob)
        .where(TrainingJob.id == job_id, TrainingJob.status == "queued", TrainingJob.cancel_requested.is_(True))
        .values(status="cancelled", finished_at=utcnow())
    ))
    if done:
        add_event(session, job_id, "job cancelled before it started")
    session.commit()
    return done == 1


class JobLease:
    """Fenced writes of one attempt. Methods open their own short sessions, so the trainer's thread and the
    heartbeat thread can both use one lease."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str, attempt: int) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.attempt = attempt

    def __repr__(self) -> str:
        return f"JobLease({self.job_id!r}, attempt={self.attempt})"

    def _mine(self) -> sa.ColumnElement[bool]:
        return sa.and_(
            TrainingJob.id == self.job_id, TrainingJob.status == "running", TrainingJob.attempts == self.attempt
        )

    def _touch(self, session: Session, **values: Any) -> bool:
        """Refresh the heartbeat (plus `values`) if the lease holds; the UPDATE also locks the row (PostgreSQL)
        or the database (SQLite) until the caller's transaction ends."""
        return updated(session, sa.update(TrainingJob).where(self._mine()).values(heartbeat_at=utcnow(), **values)) == 1

    def job(self) -> TrainingJob:
        """A detached snapshot of the job row."""
        with self.sessions() as session:
            row = session.get(TrainingJob, self.job_id)
            if row is None or row.status != "running" or row.attempts != self.attempt:
                raise JobLost(self.job_id)
            session.expunge(row)
            return row

    def beat(self) -> bool:
        """Heartbeat; returns whether cancellation was requested. Raises JobLost when the lease is gone."""
        with self.sessions() as session:
            row = session.execute(
                sa.update(TrainingJob).where(self._mine()).values(heartbeat_at=utcnow())
                .returning(TrainingJob.cancel_requested)
            ).first()
            session.commit()
        if row is None:
            raise JobLost(self.job_id)
        return bool(row[0])

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        """Add an event if the lease holds (a lost attempt's progress would only confuse the log)."""
        with self.sessions() as session:
            if not self._touch(session):
                session.rollback()
                raise JobLost(self.job_id)
            add_event(session, self.job_id, message, level=level, data=data)
            session.commit()

    def checkpoint(self, step: int, sha256: str, metrics: dict[str, float]) -> list[str] | None:
        """Record a checkpoint blob; replaces an earlier attempt's checkpoint of the same step. Returns the
        replaced rows' blobs (for the caller to collect if unreferenced), or None when nothing was recorded
        because a cancel was requested: the check and the insert are one transaction behind the job row's
        lock, so a checkpoint never lands after the request (deleting an end user deletes their job's
        checkpoints right after requesting the cancel)."""
        with self.sessions() as session:
            mine = sa.update(TrainingJob).where(self._mine(), TrainingJob.cancel_requested.is_(False))
            if updated(session, mine.values(heartbeat_at=utcnow())) != 1:
                session.rollback()
                if self.cancel_requested():
                    return None
                raise JobLost(self.job_id)
            where = sa.and_(JobCheckpoint.job_id == self.job_id, JobCheckpoint.step == step)
            replaced = list(session.execute(sa.select(JobCheckpoint.sha256).where(where)).scalars())
            session.execute(sa.delete(JobCheckpoint).where(where))
            session.add(JobCheckpoint(job_id=self.job_id, step=step, metrics=metrics, sha256=sha256))
            add_event(session, self.job_id, f"checkpoint saved at step {step}", data={"step": step, **metrics})
            session.commit()
        return [s for s in replaced if s != sha256]

    def mark_succeeded(self, session: Session, *, version_id: str, trained_tokens: int, message: str,
                       data: dict[str, Any]) -> None:
        """In the publishing transaction: status succeeded with the result; raise JobLost (aborting the
        publication) unless the lease holds and no cancel was requested."""
        stmt = (
            sa.update(TrainingJob)
            .where(self._mine(), TrainingJob.cancel_requested.is_(False))
            .values(status="succeeded", result_prefix_version_id=version_id, trained_tokens=trained_tokens,
                    finished_at=utcnow(), heartbeat_at=utcnow())
        )
        if updated(session, stmt) != 1:
            raise JobLost(self.job_id)
        add_event(session, self.job_id, message, data=data)

    def finish(self, status: str, message: str, *, error: JobError | None = None, level: str = "info",
               data: dict[str, Any] | None = None) -> bool:
        """End the attempt: `failed` (with `error`), `cancelled`, or `queued` (handed back for another attempt).
        Returns False when the lease was already gone (nothing written)."""
        values: dict[str, Any] = {"status": status}
        if status == "queued":
            values |= {"heartbeat_at": None}
        else:
            values |= {"finished_at": utcnow(), "error": error.as_json() if error is not None else None}
        with self.sessions() as session:
            if updated(session, sa.update(TrainingJob).where(self._mine()).values(**values)) != 1:
                session.rollback()
                log.warning("job %s: attempt %d lost its lease before finishing as %s", self.job_id,
                            self.attempt, status)
                return False
            add_event(session, self.job_id, message, level=level, data=data)
            session.commit()
        return True

    def cancel_requested(self) -> bool:
        with self.sessions() as session:
            return bool(session.execute(
                sa.select(TrainingJob.cancel_requested).where(TrainingJob.id == self.job_id)).scalar())
