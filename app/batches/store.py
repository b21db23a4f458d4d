"""A batch runner's hold on batches in the database: the claim, and every later write fenced on it.

The `batches` row is the batch's truth. A runner claims a batch with one conditional UPDATE that gives it a fresh
`lease_token`; only a batch nobody holds, or whose holder's heartbeat is older than `stale_after_s` (its server
died), can be claimed, so with several replicas each batch runs in one place, and a dead replica's batches are
resumed by another. Every later write is conditional on the token: a runner whose batch was taken over writes
nothing more and learns that it lost it. Finished requests are recorded in chunks, each in one transaction with
the heartbeat and the batch's counts, so a resumed batch skips every request recorded before.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.db.models import Batch, BatchResult, utcnow
from app.jobs.lease import updated
from app.services.batch_lines import LineOutcome

RUNNABLE: Final = ("in_progress", "finalizing", "cancelling")  # what a runner claims


@dataclass(frozen=True)
class Claim:
    """One runner's hold on one batch (a snapshot of what it needs to run it)."""

    batch_id: str
    tenant_id: str
    endpoint: str
    input_sha256: str
    status: str
    expires_at: datetime
    token: str


@dataclass(frozen=True)
class Beat:
    """What a fenced write saw: the batch's status (a cancel shows as `cancelling`) and its expiry."""

    status: str
    expires_at: datetime


def _claimable(cutoff: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(Batch.status.in_(RUNNABLE), sa.or_(Batch.lease_token.is_(None), Batch.heartbeat_at < cutoff))


def claim(session: Session, *, limit: int, stale_after_s: float, skip: Sequence[str] = (),
          now: datetime | None = None) -> list[Claim]:
    """Claim up to `limit` runnable batches, oldest first (each with its own conditional UPDATE, so two runners
    racing for one batch never both get it). `skip`: batches this runner already runs."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stale_after_s)
    ids = list(session.execute(
        sa.select(Batch.id).where(_claimable(cutoff), Batch.id.not_in(list(skip)))
        .order_by(Batch.created_at).limit(limit)).scalars())
    session.rollback()
    claims: list[Claim] = []
    for batch_id in ids:
        token = uuid.uuid4().hex
        got = updated(session, sa.update(Batch).where(Batch.id == batch_id, _claimable(cutoff))
                      .values(lease_token=token, heartbeat_at=now, attempts=Batch.attempts + 1))
        session.commit()
        if got != 1:
            continue  # another runner was quicker
        row = session.get_one(Batch, batch_id)
        claims.append(Claim(row.id, row.tenant_id, row.endpoint, row.input_sha256, row.status, row.expires_at,
                            token))
        session.rollback()
    return claims


def _mine(claim: Claim) -> sa.ColumnElement[bool]:
    return sa.and_(Batch.id == claim.batch_id, Batch.lease_token == claim.token)


def done_lines(session: Session, batch_id: str) -> set[int]:
    """The input lines whose results are recorded."""
    return set(session.execute(sa.select(BatchResult.line).where(BatchResult.batch_id == batch_id)).scalars())


def record(session: Session, claim: Claim, outcomes: Sequence[LineOutcome]) -> Beat | None:
    """Record finished requests (possibly none: a heartbeat) with the counts they add, in one transaction fenced on
    the claim. None when the claim was lost (nothing is written)."""
    row = session.execute(
        sa.update(Batch).where(_mine(claim)).values(
            heartbeat_at=utcnow(),
            completed=Batch.completed + sum(o.ok for o in outcomes),
            failed=Batch.failed + sum(not o.ok for o in outcomes),
            prompt_tokens=Batch.prompt_tokens + sum(o.prompt_tokens for o in outcomes),
            completion_tokens=Batch.completion_tokens + sum(o.completion_tokens for o in outcomes),
        ).returning(Batch.status, Batch.expires_at)
    ).first()
    if row is None:
        session.rollback()
        return None
    session.add_all(BatchResult(batch_id=claim.batch_id, line=o.line, ok=o.ok, record=o.record) for o in outcomes)
    session.commit()
    return Beat(row.status, row.expires_at)


def release(session: Session, claim: Claim) -> None:
    """Give the batch up (a server stopping): any runner may claim it at once."""
    updated(session, sa.update(Batch).where(_mine(claim)).values(lease_token=None, heartbeat_at=None))
    session.commit()
