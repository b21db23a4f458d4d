"""The Files API: a tenant's JSONL files. Keyword-only, tenant-scoped functions.

Purposes: `fine-tune` (training data), `batch` (Batch API requests, checked line by line when a batch is created
from the file) and `batch_output` (a batch's results, written by its runner: app/batches). An upload is counted
while it streams (413 past the limit); a training file's every line is validated (`parse_jsonl`, its line number
in the 400) and a batch file must be UTF-8 text within the line limit, before anything is stored. The bytes go
to the blob store first (content-addressed, so the same file uploaded twice is stored once), then the row commits;
a delete commits first, then collects the blob when no row of any kind references it any more.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile
from starlette.requests import Request

from app.catalog.versions import store_blob_then_commit
from app.db.models import BATCH_UNFINISHED_STATUSES, JOB_TERMINAL_STATUSES, Batch, File, TrainingJob
from app.errors import Conflict, InvalidRequest, NotFound, Unavailable
from app.jobs.data import parse_jsonl
from app.jobs.types import TrainingDataError
from app.protocol.files import FileDeleted, FileList, FileObject
from app.services.limits import Limits, check_storage
from app.services.object_ids import is_id
from app.services.pagination import after_cursor, cursor_after, fetch_page
from app.services.prefixes import PrefixStores, delete_unreferenced_blobs
from app.services.uploads import limited_receive, read_part, refuse_unknown_fields
from prefix_store.blobs import BlobNotFound, BlobStoreUnavailable

log = logging.getLogger(__name__)

PURPOSES = ("fine-tune", "batch")  # what a client may upload; `batch_output` files are the server's
MAX_FILENAME = 255


@dataclass(frozen=True)
class Upload:
    purpose: str
    filename: str
    data: bytes


def _filename(raw: str | None) -> str:
    # Only the last path component of what the client sent, bounded to the column's size.
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return (name or "upload.jsonl")[:MAX_FILENAME]


def check_purpose(purpose: object) -> str:
    if not isinstance(purpose, str) or not purpose:
        raise InvalidRequest("missing form field `purpose` (\"fine-tune\" or \"batch\")", param="purpose",
                             code="missing_purpose")
    if purpose not in PURPOSES:
        raise InvalidRequest(f"unsupported purpose {purpose[:40]!r}: this server accepts \"fine-tune\" and \"batch\" "
                             "files", param="purpose", code="invalid_purpose")
    return purpose


async def read_file_form(request: Request, *, limit: int) -> Upload:
    """Parse `POST /v1/files` (multipart: `file` and `purpose`); the body is counted while it streams and the
    file part may hold at most `limit` bytes (413 beyond)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("send multipart/form-data with a `file` and `purpose` (\"fine-tune\" or \"batch\")")
    limited = Request(request.scope, limited_receive(request.receive, limit))
    async with limited.form(max_files=2, max_fields=8) as form:
        purpose = check_purpose(form.get("purpose"))
        parts = form.getlist("file")
        if len(parts) != 1 or not isinstance(parts[0], UploadFile):
            raise InvalidRequest("send exactly one `file` part (a JSONL file, with a filename)", param="file",
                                 code="missing_file")
        refuse_unknown_fields(form, {"file", "purpose"})
        data = await read_part(parts[0], limit=limit)
        return Upload(purpose, _filename(parts[0].filename), data)


def file_object(row: File) -> FileObject:
    return FileObject(id=row.id, bytes=row.bytes, created_at=int(row.created_at.timestamp()),
                      filename=row.filename, purpose=row.purpose,  # type: ignore[arg-type]  # one of FilePurpose
                      status="processed")


def create_file(
    *, session: Session, stores: PrefixStores, tenant_id: str, upload: Upload, max_examples: int,
    limits: Limits | None = None,
) -> FileObject:
    """Validate the file, then store the bytes and the row (nothing is stored when anything fails)."""
    lines = _batch_lines(upload, max_lines=max_examples) if upload.purpose == "batch" else \
        _training_examples(upload, max_examples=max_examples)
    if limits is not None:
        check_storage(session=session, limits=limits, tenant_id=tenant_id, new_bytes=len(upload.data))
    def commit(sha: str) -> File:
        row = File(tenant_id=tenant_id, filename=upload.filename, purpose=upload.purpose, bytes=len(upload.data),
                   sha256=sha, line_count=lines, status="processed")
        session.add(row)
        session.commit()
        return row

    row = store_blob_then_commit(session=session, blobs=stores.blobs, data=upload.data, commit=commit)
    log.info("tenant %s stored file %s (%d bytes, %d examples)", tenant_id, row.id, row.bytes, lines)
    return file_object(row)


def _training_examples(upload: Upload, *, max_examples: int) -> int:
    try:
        return len(parse_jsonl(upload.data, max_examples=max_examples))
    except TrainingDataError as exc:
        raise InvalidRequest(f"invalid training file {upload.filename!r}: {exc}", param="file",
                             code="invalid_file") from None


def _batch_lines(upload: Upload, *, max_lines: int) -> int:
    """A batch input file's non-blank lines; its requests themselves are checked when a batch is created."""
    try:
        text = upload.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"invalid batch file {upload.filename!r}: not UTF-8 text (byte {exc.start})",
                             param="file", code="invalid_file") from None
    lines = sum(1 for line in text.splitlines() if line.strip())
    if lines > max_lines:
        raise InvalidRequest(f"invalid batch file {upload.filename!r}: {lines} requests, at most {max_lines} "
                             "are accepted", param="file", code="invalid_file")
    return lines


def get_file_row(session: Session, *, tenant_id: str, file_id: str, param: str = "file_id") -> File:
    """The tenant's file, or the 404 a missing one (or another tenant's) gets."""
    row = None if not is_id("file", file_id) else session.execute(
        sa.select(File).where(File.id == file_id, File.tenant_id == tenant_id)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"No such File object: {file_id[:100]}", param=param)
    return row


def list_files(
    *, session: Session, tenant_id: str, purpose: str | None = None, limit: int, after: str | None = None,
    order: str = "desc",
) -> FileList:
    """The tenant's files, newest first (or oldest first with order="asc"), `limit` per page."""
    stmt = sa.select(File).where(File.tenant_id == tenant_id)
    if purpose is not None:
        stmt = stmt.where(File.purpose == purpose)
    cursor = cursor_after(after, lambda i: get_file_row(session, tenant_id=tenant_id, file_id=i, param="after"))
    rows, more = fetch_page(session, after_cursor(stmt, File.created_at, File.id, cursor,
                                                  descending=order != "asc"), limit)
    data = [file_object(r.File) for r in rows]
    return FileList(data=data, has_more=more, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


def get_file(*, session: Session, tenant_id: str, file_id: str) -> FileObject:
    return file_object(get_file_row(session, tenant_id=tenant_id, file_id=file_id))


def file_content(*, session: Session, stores: PrefixStores, tenant_id: str, file_id: str) -> tuple[str, bytes]:
    """(filename, the bytes as uploaded)."""
    row = get_file_row(session, tenant_id=tenant_id, file_id=file_id)
    try:
        return row.filename, stores.blobs.get(row.sha256)
    except (BlobNotFound, BlobStoreUnavailable) as exc:
        log.error("cannot read blob %s of file %s: %r", row.sha256, row.id, exc)
        raise Unavailable("the file cannot be read right now; retry shortly", headers={"Retry-After": "5"}) from None


def delete_file(*, session: Session, stores: PrefixStores, tenant_id: str, file_id: str) -> FileDeleted:
    """Delete the row, then the blob if nothing else references it. A file a job still has to read (queued or
    running) is refused with 409: cancel the job first."""
    row = get_file_row(session, tenant_id=tenant_id, file_id=file_id)
    user = session.execute(
        sa.select(TrainingJob.id).where(
            TrainingJob.tenant_id == tenant_id, TrainingJob.status.not_in(JOB_TERMINAL_STATUSES),
            sa.or_(TrainingJob.training_file_id == row.id, TrainingJob.validation_file_id == row.id),
        ).limit(1)
    ).scalar_one_or_none()
    if user is not None:
        raise Conflict(f"file {row.id} is used by fine-tuning job {user}, which has not finished; cancel the job "
                       "or wait for it", param="file_id", code="file_in_use")
    batch = session.execute(sa.select(Batch.id).where(
        Batch.tenant_id == tenant_id, Batch.input_file_id == row.id, Batch.status.in_(BATCH_UNFINISHED_STATUSES),
    ).limit(1)).scalar_one_or_none()
    if batch is not None:
        raise Conflict(f"file {row.id} is the input of batch {batch}, which has not finished; cancel the batch or "
                       "wait for it", param="file_id", code="file_in_use")
    sha = row.sha256
    session.execute(sa.delete(File).where(File.id == row.id))
    session.commit()
    log.info("tenant %s deleted file %s", tenant_id, row.id)
    delete_unreferenced_blobs(session=session, stores=stores, shas=[sha])
    return FileDeleted(id=row.id)
