"""A training job's event log and checkpoints, as OpenAI lists them, and the event log as a live stream.

Events are written by the worker (app/training/); here they are only read: pages newest first (OpenAI's
order), or, streaming, oldest first from where the client is and then each new one as it lands, until the job
has finished (the database is polled: it is the one place every replica and worker shares).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import JOB_TERMINAL_STATUSES, JobCheckpoint, JobEvent, TrainingJob
from app.errors import InvalidRequest
from app.protocol.fine_tuning import (
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobEvent,
    FineTuningJobEventList,
)
from app.services.fine_tuning import job_row
from app.services.object_ids import is_id
from app.services.pagination import after_cursor, fetch_page

log = logging.getLogger(__name__)

EVENT_POLL_S: Final = 0.5  # how often a stream looks for new events
LEVELS: Final = frozenset({"info", "warn", "error"})
METRIC_KEYS: Final = frozenset({"step", "train_loss", "val_loss"})


def event_object(e: JobEvent) -> FineTuningJobEvent:
    data = e.data or None
    return FineTuningJobEvent(
        id=e.id, created_at=int(e.created_at.timestamp()), level=e.level if e.level in LEVELS else "info",  # type: ignore[arg-type]
        message=e.message, data=data, type="metrics" if data and METRIC_KEYS & set(data) else "message",
    )


def _event_cursor(session: Session, job_id: str, event_id: str) -> tuple[datetime, str]:
    row = None if not is_id("job_event", event_id) else session.execute(
        sa.select(JobEvent.created_at, JobEvent.id).where(JobEvent.id == event_id, JobEvent.job_id == job_id)
    ).first()
    if row is None:
        raise InvalidRequest(f"after: no event {event_id[:100]!r} in this job", param="after")
    return row.created_at, row.id


def list_events(*, session: Session, tenant_id: str, job_id: str, limit: int, after: str | None = None
                ) -> FineTuningJobEventList:
    """The job's events, newest first; `after` = the last event id of the previous page."""
    job = job_row(session, tenant_id=tenant_id, job_id=job_id)
    cursor = _event_cursor(session, job.id, after) if after is not None else None
    stmt = after_cursor(sa.select(JobEvent).where(JobEvent.job_id == job.id), JobEvent.created_at, JobEvent.id,
                        cursor, descending=True)
    rows, more = fetch_page(session, stmt, limit)
    return FineTuningJobEventList(data=[event_object(r.JobEvent) for r in rows], has_more=more)


def open_event_stream(*, session: Session, sessions: sessionmaker[Session], tenant_id: str, job_id: str,
                      after: str | None = None, poll_s: float = EVENT_POLL_S) -> AsyncIterator[str]:
    """Check the job (404 before any stream starts), then return the stream: each event's JSON oldest first
    (after `after`, or from the first), new ones as they land, and `[DONE]` once the job has finished."""
    job = job_row(session, tenant_id=tenant_id, job_id=job_id)
    cursor = _event_cursor(session, job.id, after) if after is not None else None
    session.close()  # a stream may last hours: hold no connection between polls
    return _stream(sessions, job.id, cursor, poll_s)


@dataclass(frozen=True)
class EventPoll:
    """One look at a job: its status (None once it is gone), the events after the cursor (oldest first), and the
    cursor to pass next time."""

    status: str | None
    events: list[FineTuningJobEvent]
    cursor: tuple[datetime, str] | None

    @property
    def finished(self) -> bool:
        return self.status is None or self.status in JOB_TERMINAL_STATUSES


def poll_events(*, sessions: sessionmaker[Session], job_id: str, cursor: tuple[datetime, str] | None = None
                ) -> EventPoll:
    """The job's status and its events after `cursor`. The status is read first: every event written before the
    job finished is then in the same or a later poll. Followers (the SSE stream, `prefixserve train` in-process)
    call it in a loop, one short session each time."""
    with sessions() as session:
        status = session.execute(sa.select(TrainingJob.status).where(TrainingJob.id == job_id)).scalar()
        stmt = after_cursor(sa.select(JobEvent).where(JobEvent.job_id == job_id), JobEvent.created_at, JobEvent.id,
                            cursor, descending=False)
        rows = session.execute(stmt).scalars().all()
        if rows:
            cursor = (rows[-1].created_at, rows[-1].id)
        return EventPoll(status, [event_object(e) for e in rows], cursor)


async def _stream(sessions: sessionmaker[Session], job_id: str, cursor: tuple[datetime, str] | None,
                  poll_s: float) -> AsyncIterator[str]:
    while True:
        polled = await asyncio.to_thread(poll_events, sessions=sessions, job_id=job_id, cursor=cursor)
        for e in polled.events:
            yield e.model_dump_json()
        cursor = polled.cursor
        if polled.finished:
            break
        await asyncio.sleep(poll_s)
    yield "[DONE]"


def checkpoint_name(job: TrainingJob, step: int) -> str:
    """OpenAI's checkpoint naming (`ft:<base>:<org>:<suffix>:<job>:ckpt-step-<n>`), with our prefix name."""
    return f"ft:{job.model}:{job.tenant_id}:{job.prefix_name}:{job.id}:ckpt-step-{step}"


def _metrics(step: int, stored: dict[str, Any] | None) -> dict[str, float]:
    out = {k: float(v) for k, v in (stored or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if "val_loss" in out:
        out.setdefault("valid_loss", out["val_loss"])  # OpenAI's name for it
    out["step"] = float(step)
    return out


def list_checkpoints(*, session: Session, tenant_id: str, job_id: str, limit: int, after: str | None = None
                     ) -> FineTuningJobCheckpointList:
    """The job's checkpoints, latest step first; `after` = the last checkpoint id of the previous page."""
    job = job_row(session, tenant_id=tenant_id, job_id=job_id)
    cursor = None
    if after is not None:
        last = None if not is_id("job_checkpoint", after) else session.execute(
            sa.select(JobCheckpoint.step, JobCheckpoint.id).where(JobCheckpoint.id == after,
                                                                  JobCheckpoint.job_id == job.id)).first()
        if last is None:
            raise InvalidRequest(f"after: no checkpoint {after[:100]!r} in this job", param="after")
        cursor = (last.step, last.id)
    stmt = after_cursor(sa.select(JobCheckpoint).where(JobCheckpoint.job_id == job.id), JobCheckpoint.step,
                        JobCheckpoint.id, cursor, descending=True)
    rows, more = fetch_page(session, stmt, limit)
    data = [FineTuningJobCheckpoint(
        id=c.id, created_at=int(c.created_at.timestamp()), fine_tuned_model_checkpoint=checkpoint_name(job, c.step),
        fine_tuning_job_id=job.id, metrics=_metrics(c.step, c.metrics), step_number=c.step)
        for c in (r.JobCheckpoint for r in rows)]
    return FineTuningJobCheckpointList(data=data, has_more=more, first_id=data[0].id if data else None,
                                       last_id=data[-1].id if data else None)
