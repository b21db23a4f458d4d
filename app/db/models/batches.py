"""Batch API batches and the finished lines of a running batch."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from app.db.models.base import (
    BATCH_STATUSES,
    SHA256,
    Base,
    UTCDateTime,
    created_at_column,
    fk_column,
    json_column,
    pk_column,
)


class Batch(Base):
    """A Batch API batch (`/v1/batches`): the requests of an input file, run in the background at batch priority.

    A server's batch runner holds the batch while it runs it: `lease_token` (set by its claim), refreshed through
    `heartbeat_at`; every write of the runner is conditional on its token, and a batch whose heartbeat went stale
    is claimed by another runner (app/batches/store.py).
    """

    __tablename__ = "batches"

    id: Mapped[str] = pk_column("batch")
    tenant_id: Mapped[str] = fk_column("tenants.id", "CASCADE")
    endpoint: Mapped[str] = mapped_column(sa.String(64))
    # No foreign keys to files: OpenAI keeps showing a deleted file's id (an input file is kept while it runs).
    input_file_id: Mapped[str] = mapped_column(sa.String(64))
    input_sha256: Mapped[str] = mapped_column(SHA256)
    completion_window: Mapped[str] = mapped_column(sa.String(16))
    status: Mapped[str] = mapped_column(sa.String(16))  # one of BATCH_STATUSES
    user_metadata: Mapped[dict[str, str] | None] = json_column(nullable=True)  # the client's `metadata`
    errors: Mapped[list[dict[str, Any]] | None] = json_column(nullable=True)  # {code, message, param, line}
    total: Mapped[int] = mapped_column(sa.Integer)
    completed: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    failed: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    output_file_id: Mapped[str | None] = mapped_column(sa.String(64))
    error_file_id: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = created_at_column()
    in_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finalizing_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_token: Mapped[str | None] = mapped_column(sa.String(64))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")  # claims so far

    __table_args__ = (
        sa.Index(None, "tenant_id", "created_at"),
        sa.Index(None, "status", "created_at"),  # the runners' "unfinished batches, oldest first"
        sa.CheckConstraint(f"status IN {BATCH_STATUSES!r}", name="status"),
    )


class BatchResult(Base):
    """One finished request of a running batch: its output line, kept until the batch's output files are
    written (then deleted). A runner that resumes a batch skips the lines found here."""

    __tablename__ = "batch_results"

    batch_id: Mapped[str] = mapped_column(
        sa.String(64), sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    line: Mapped[int] = mapped_column(sa.Integer, primary_key=True)  # 1-based line of the input file
    ok: Mapped[bool] = mapped_column(sa.Boolean)  # a 2xx answer (output file), else the error file
    record: Mapped[str] = mapped_column(sa.Text)  # the output line's JSON
