"""The Batch API (`/v1/batches`): create, retrieve, list, cancel. Keyword-only, tenant-scoped functions.

Creating a batch reads its input file and checks every line (app/services/batch_input.py) in the request: a
malformed file gives a batch in status `failed` whose `errors` name the lines, and nothing of it ever runs;
otherwise the batch is `in_progress` at once (this server never shows `validating`). Running it is the batch
runner's (app/batches/runner.py, an asyncio task in every API server process that serves the model); cancelling
sets `cancelling`, and the runner that holds the batch stops it, keeps what finished and marks it `cancelled`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Final

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.db.models import BATCH_UNFINISHED_STATUSES, Batch, utcnow
from app.errors import Conflict, InvalidRequest, NotFound, Unavailable
from app.jobs.lease import updated
from app.protocol.batches import (
    BatchCreate,
    BatchError,
    BatchErrors,
    BatchList,
    BatchObject,
    BatchRequestCounts,
    BatchUsage,
)
from app.services.batch_input import parse_batch_input
from app.services.files import get_file_row
from app.services.limits import Limits, quota_reached
from app.services.object_ids import is_id
from app.services.pagination import after_cursor, cursor_after, fetch_page
from prefix_store.blobs import BlobNotFound, BlobStore, BlobStoreUnavailable

log = logging.getLogger(__name__)

COMPLETION_WINDOW: Final = timedelta(hours=24)  # the one window OpenAI offers ("24h")


def _unix(at: datetime | None) -> int | None:
    return int(at.timestamp()) if at is not None else None


def batch_object(row: Batch) -> BatchObject:
    errors = BatchErrors(data=[BatchError(**e) for e in row.errors]) if row.errors else None
    return BatchObject(
        id=row.id, endpoint=row.endpoint, errors=errors,  # type: ignore[arg-type]  # the row holds a BatchEndpoint
        input_file_id=row.input_file_id, completion_window=row.completion_window,
        status=row.status,  # type: ignore[arg-type]  # the CHECK constraint keeps it one of BatchStatus
        output_file_id=row.output_file_id, error_file_id=row.error_file_id, created_at=int(row.created_at.timestamp()),
        in_progress_at=_unix(row.in_progress_at), expires_at=_unix(row.expires_at),
        finalizing_at=_unix(row.finalizing_at), completed_at=_unix(row.completed_at), failed_at=_unix(row.failed_at),
        expired_at=_unix(row.expired_at), cancelling_at=_unix(row.cancelling_at),
        cancelled_at=_unix(row.cancelled_at),
        request_counts=BatchRequestCounts(total=row.total, completed=row.completed, failed=row.failed),
        metadata=row.user_metadata,
        usage=BatchUsage(input_tokens=row.prompt_tokens, output_tokens=row.completion_tokens,
                         total_tokens=row.prompt_tokens + row.completion_tokens),
    )


def get_batch_row(session: Session, *, tenant_id: str, batch_id: str, param: str = "batch_id") -> Batch:
    """The tenant's batch, or the 404 a missing one (or another tenant's) gets."""
    row = None if not is_id("batch", batch_id) else session.execute(
        sa.select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id)).scalar_one_or_none()
    if row is None:
        raise NotFound(f"No such Batch object: {batch_id[:100]}", param=param)
    return row


def unfinished_batch_count(session: Session, tenant_id: str) -> int:
    """Batches counted against max_concurrent_batches: those not yet finished."""
    return int(session.scalar(sa.select(sa.func.count()).select_from(Batch).where(
        Batch.tenant_id == tenant_id, Batch.status.in_(BATCH_UNFINISHED_STATUSES))) or 0)


def check_new_batch(*, session: Session, limits: Limits | None, tenant_id: str) -> None:
    """max_concurrent_batches counts the tenant's batches not yet finished."""
    cap = limits.max_concurrent_batches if limits is not None else None
    if cap is None:
        return
    if unfinished_batch_count(session, tenant_id) >= cap:
        raise quota_reached("max_concurrent_batches", cap)


def create_batch(*, session: Session, blobs: BlobStore, tenant_id: str, req: BatchCreate, limits: Limits | None,
                 max_lines: int) -> BatchObject:
    """Check the input file and store the batch: `in_progress`, or `failed` with the file's errors."""
    check_new_batch(session=session, limits=limits, tenant_id=tenant_id)
    file = get_file_row(session, tenant_id=tenant_id, file_id=req.input_file_id, param="input_file_id")
    if file.purpose != "batch":
        raise InvalidRequest(f"input_file_id: file {file.id} has purpose {file.purpose!r}, not 'batch'",
                             param="input_file_id", code="invalid_file_purpose")
    try:
        data = blobs.get(file.sha256)
    except (BlobNotFound, BlobStoreUnavailable) as exc:
        log.error("cannot read blob %s of batch input file %s: %r", file.sha256, file.id, exc)
        raise Unavailable("the input file cannot be read right now; retry shortly",
                          headers={"Retry-After": "5"}) from None
    lines, errors = parse_batch_input(data, endpoint=req.endpoint, max_lines=max_lines)
    now = utcnow()
    row = Batch(tenant_id=tenant_id, endpoint=req.endpoint, input_file_id=file.id, input_sha256=file.sha256,
                completion_window=req.completion_window, user_metadata=req.metadata, created_at=now,
                expires_at=now + COMPLETION_WINDOW)
    if errors:
        row.status, row.failed_at, row.total = "failed", now, 0
        row.errors = [e.model_dump() for e in errors]
    else:
        row.status, row.in_progress_at, row.total = "in_progress", now, len(lines)
    session.add(row)
    session.commit()
    log.info("tenant %s created batch %s (%s, %d requests%s)", tenant_id, row.id, row.endpoint, len(lines),
             f", failed: {len(errors)} errors" if errors else "")
    return batch_object(row)


def get_batch(*, session: Session, tenant_id: str, batch_id: str) -> BatchObject:
    return batch_object(get_batch_row(session, tenant_id=tenant_id, batch_id=batch_id))


def list_batches(*, session: Session, tenant_id: str, limit: int, after: str | None = None) -> BatchList:
    """The tenant's batches, newest first, `limit` per page."""
    cursor = cursor_after(after, lambda i: get_batch_row(session, tenant_id=tenant_id, batch_id=i, param="after"))
    stmt = after_cursor(sa.select(Batch).where(Batch.tenant_id == tenant_id), Batch.created_at, Batch.id, cursor,
                        descending=True)
    rows, more = fetch_page(session, stmt, limit)
    data = [batch_object(r.Batch) for r in rows]
    return BatchList(data=data, has_more=more, first_id=data[0].id if data else None,
                     last_id=data[-1].id if data else None)


def cancel_batch(*, session: Session, tenant_id: str, batch_id: str) -> BatchObject:
    """An in-progress batch becomes `cancelling` (idempotent); its runner ends it as `cancelled`, keeping the
    results of its finished requests. 409 once it is finalizing or finished."""
    row = get_batch_row(session, tenant_id=tenant_id, batch_id=batch_id)
    moved = updated(session, sa.update(Batch).where(Batch.id == row.id, Batch.status.in_(("validating", "in_progress")))
                    .values(status="cancelling", cancelling_at=utcnow()))
    session.commit()
    session.refresh(row)
    if not moved and row.status != "cancelling":
        raise Conflict(f"batch {row.id} is {row.status}; only a batch in progress can be cancelled", param="batch_id",
                       code="batch_not_cancellable")
    if moved:
        log.info("tenant %s asked to cancel batch %s", tenant_id, row.id)
    return batch_object(row)
