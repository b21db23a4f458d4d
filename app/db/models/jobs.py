"""Training jobs, their event logs and checkpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.models.base import (
    JOB_STATUSES,
    SHA256,
    Base,
    UTCDateTime,
    created_at_column,
    fk_column,
    json_column,
    pk_column,
)


class TrainingJob(Base):
    """A fine-tuning (prefix-tuning) job; a personalization job has `end_user_id` set."""

    __tablename__ = "training_jobs"

    id: Mapped[str] = pk_column("training_job")
    tenant_id: Mapped[str] = fk_column("tenants.id", "CASCADE")
    status: Mapped[str] = mapped_column(sa.String(32))  # one of JOB_STATUSES
    model: Mapped[str] = mapped_column(sa.String(200))
    training_file_id: Mapped[str | None] = fk_column("files.id", "SET NULL", nullable=True)
    validation_file_id: Mapped[str | None] = fk_column("files.id", "SET NULL", nullable=True)
    # SET NULL, not CASCADE: deleting an end user keeps the tenant's record of the job (and its usage).
    end_user_id: Mapped[str | None] = fk_column("end_users.id", "SET NULL", nullable=True)
    prefix_name: Mapped[str] = mapped_column(sa.String(200))
    hyperparameters: Mapped[dict[str, Any]] = json_column()
    options: Mapped[dict[str, Any]] = json_column()  # num_virtual_tokens, prefix_projection, warm start
    result_prefix_version_id: Mapped[str | None] = fk_column("prefix_versions.id", "SET NULL", nullable=True)
    error: Mapped[dict[str, Any] | None] = json_column(nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(sa.BigInteger)
    queue_job_id: Mapped[str | None] = mapped_column(sa.String(200))
    created_at: Mapped[datetime] = created_at_column()
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean, default=False, server_default=sa.false())
    # Set by the worker while it trains; a `running` job whose heartbeat is stale lost its worker.
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")

    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", passive_deletes=True, order_by="JobEvent.created_at"
    )
    checkpoints: Mapped[list[JobCheckpoint]] = relationship(
        back_populates="job", passive_deletes=True, order_by="JobCheckpoint.step"
    )

    __table_args__ = (
        sa.Index(None, "tenant_id", "created_at"),
        sa.Index(None, "status", "created_at"),  # the worker's "oldest queued job" lookup
        sa.CheckConstraint(f"status IN {JOB_STATUSES!r}", name="status"),
    )


class JobEvent(Base):
    """A line of a training job's event log (OpenAI fine_tuning.job.event)."""

    __tablename__ = "job_events"

    id: Mapped[str] = pk_column("job_event")
    job_id: Mapped[str] = fk_column("training_jobs.id", "CASCADE")
    created_at: Mapped[datetime] = created_at_column()
    level: Mapped[str] = mapped_column(sa.String(16))  # "info" | "warn" | "error"
    message: Mapped[str] = mapped_column(sa.Text)
    data: Mapped[dict[str, Any] | None] = json_column(nullable=True)

    job: Mapped[TrainingJob] = relationship(back_populates="events")

    __table_args__ = (sa.Index(None, "job_id", "created_at"),)


class JobCheckpoint(Base):
    """A prefix saved during training (OpenAI fine_tuning.job.checkpoint); the tensors are the blob sha256."""

    __tablename__ = "job_checkpoints"

    id: Mapped[str] = pk_column("job_checkpoint")
    job_id: Mapped[str] = fk_column("training_jobs.id", "CASCADE")
    step: Mapped[int] = mapped_column(sa.Integer)
    metrics: Mapped[dict[str, Any]] = json_column()
    sha256: Mapped[str] = mapped_column(SHA256)
    created_at: Mapped[datetime] = created_at_column()

    job: Mapped[TrainingJob] = relationship(back_populates="checkpoints")

    __table_args__ = (sa.UniqueConstraint("job_id", "step"), sa.Index(None, "sha256"))
