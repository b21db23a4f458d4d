"""The end of a batch: its output and error files, and its final status, in one transaction fenced on the claim.

The output file holds the answered requests (2xx), the error file the others, each in input order, one JSON
line per request; a file with no line is not written (its id stays null, as OpenAI). An expired batch's
unfinished requests go to the error file with the error `batch_expired`; a cancelled batch's are left out. The
blobs are written first (content-addressed), then one transaction inserts the file rows, moves the batch to its
final status and deletes its recorded results: a runner that dies before that commit leaves the batch to be
finished again by whoever claims it next.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.batches.store import Claim
from app.catalog.versions import store_blob_then_commit
from app.db.models import Batch, BatchResult, File, utcnow
from app.jobs.lease import updated
from prefix_store.blobs import BlobStore

log = logging.getLogger(__name__)

Outcome = Literal["completed", "cancelled", "expired"]
EXPIRED_MESSAGE: Final = "the batch expired (its 24 h completion window ended) before this request ran"


class ClaimLost(Exception):
    """Another runner holds the batch now."""


def _expired_record(custom_id: str) -> str:
    record = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
              "error": {"code": "batch_expired", "message": EXPIRED_MESSAGE}}
    return json.dumps(record, separators=(",", ":"))


def start_finalizing(session: Session, claim: Claim) -> bool:
    """A batch whose requests have all finished shows `finalizing` while its files are written; False when the
    claim was lost."""
    moved = updated(session, sa.update(Batch).where(Batch.id == claim.batch_id, Batch.lease_token == claim.token)
                    .values(status=sa.case((Batch.status == "in_progress", "finalizing"), else_=Batch.status),
                            finalizing_at=sa.func.coalesce(Batch.finalizing_at, utcnow()), heartbeat_at=utcnow()))
    session.commit()
    return moved == 1


def finish(session: Session, blobs: BlobStore, claim: Claim, outcome: Outcome,
           unfinished: Sequence[tuple[int, str]] = ()) -> bool:
    """Write the batch's files and its final status (`outcome`); `unfinished`: (line, custom_id) of the requests
    that never ran (an expired batch reports them). False when the claim was lost (nothing is written)."""
    results = session.execute(sa.select(BatchResult.line, BatchResult.ok, BatchResult.record)
                              .where(BatchResult.batch_id == claim.batch_id)).all()
    session.rollback()
    lines: list[tuple[int, bool, str]] = [(r.line, r.ok, r.record) for r in results]
    if outcome == "expired":
        lines += [(line, False, _expired_record(custom_id)) for line, custom_id in unfinished]
    lines.sort()
    output = [record for _, ok, record in lines if ok]
    errors = [record for _, ok, record in lines if not ok]
    now = utcnow()
    values: dict[str, Any] = {"status": outcome, f"{outcome}_at": now, "lease_token": None, "heartbeat_at": None}
    if outcome == "expired":
        values["failed"] = Batch.failed + len(unfinished)

    def commit(file_ids: dict[str, str | None]) -> None:
        moved = updated(session, sa.update(Batch).where(Batch.id == claim.batch_id, Batch.lease_token == claim.token)
                        .values(**values, output_file_id=file_ids.get("output"), error_file_id=file_ids.get("error")))
        if moved != 1:
            raise ClaimLost(claim.batch_id)
        session.execute(sa.delete(BatchResult).where(BatchResult.batch_id == claim.batch_id))
        session.commit()

    files = [(kind, records) for kind, records in (("output", output), ("error", errors)) if records]
    try:
        _store_files(session, blobs, claim, files, {}, commit)
    except ClaimLost:
        log.warning("batch %s: lost its claim while finishing; another runner finishes it", claim.batch_id)
        return False
    log.info("batch %s %s: %d answered, %d errors", claim.batch_id, outcome, len(output), len(errors))
    return True


def _store_files(session: Session, blobs: BlobStore, claim: Claim, files: list[tuple[str, list[str]]],
                 ids: dict[str, str | None], commit: Callable[[dict[str, str | None]], None]) -> None:
    """Write each file's blob and add its row (the blobs before the one transaction that commits them all)."""
    if not files:
        commit(ids)
        return
    (kind, records), rest = files[0], files[1:]
    data = ("\n".join(records) + "\n").encode()

    def add_row(sha: str) -> None:
        row = File(tenant_id=claim.tenant_id, filename=f"{claim.batch_id}_{kind}.jsonl", purpose="batch_output",
                   bytes=len(data), sha256=sha, line_count=len(records), status="processed")
        session.add(row)
        session.flush()
        _store_files(session, blobs, claim, rest, {**ids, kind: row.id}, commit)

    store_blob_then_commit(session=session, blobs=blobs, data=data, commit=add_row)
