"""The database schema (docs/storage.md), as SQLAlchemy 2 typed declarative models.

Tables are made only by the Alembic migrations in `migrations/versions/`; a test checks that the migrated
schema and these models agree. Every constraint is named (see `NAMING_CONVENTION`) so migrations can drop
and alter them by name on SQLite and PostgreSQL alike.

Conventions: string primary keys with a readable prefix (`app.db.session.new_id`, filled in on insert);
timestamps are timezone-aware UTC (`UTCDateTime`); deletes cascade in the database (`ON DELETE CASCADE`),
so ORM relationships use `passive_deletes=True` and deleting a tenant row removes everything it owns.
JSON columns are not mutation-tracked: assign a new dict/list, do not edit one in place.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from app.db.session import IdKind, new_id

NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SOURCE_FORMATS: Final = ("native", "peft", "trained")
# What a prefix version holds (prefix_store/types.py PrefixKind): per-layer keys/values, or a soft prompt.
PREFIX_KINDS: Final = ("prefix_tuning", "prompt_tuning", "p_tuning")
JOB_STATUSES: Final = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
JOB_TERMINAL_STATUSES: Final = frozenset({"succeeded", "failed", "cancelled"})
# OpenAI's batch statuses ("validating" is never stored: a batch's input is checked before its row is written).
BATCH_STATUSES: Final = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                         "cancelled")
BATCH_UNFINISHED_STATUSES: Final = ("validating", "in_progress", "finalizing", "cancelling")
PERSONAL_PREFIX_PREFIX: Final = "user:"  # a personal prefix is named `user:<end user's external id>`


def utcnow() -> datetime:
    return datetime.now(UTC)


def personal_prefix_name(external_id: str) -> str:
    """The reserved prefix name of an end user's personal prefix."""
    return PERSONAL_PREFIX_PREFIX + external_id


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend; naive datetimes are refused.

    PostgreSQL stores `timestamptz`. SQLite has no time zones (SQLAlchemy would drop the offset without
    converting), so values are converted to UTC and stored naive, and read back as UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: use a timezone-aware one (app.db.models.utcnow)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


# Column helpers: one definition of each recurring column shape.
def _pk(kind: IdKind) -> Mapped[str]:
    return mapped_column(sa.String(64), primary_key=True, default=lambda: new_id(kind))


def _fk(target: str, ondelete: str, *, nullable: bool = False) -> Mapped[Any]:
    return mapped_column(sa.String(64), sa.ForeignKey(target, ondelete=ondelete), nullable=nullable)


def _created_at() -> Mapped[datetime]:
    return mapped_column(UTCDateTime(), default=utcnow)


def _json(*, nullable: bool = False) -> Mapped[Any]:
    # none_as_null: a Python None is SQL NULL, not the JSON literal `null`.
    return mapped_column(sa.JSON(none_as_null=True), nullable=nullable)


SHA256 = sa.String(64)  # lowercase hex


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = _pk("tenant")
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    created_at: Mapped[datetime] = _created_at()


class ApiKey(Base):
    """A tenant's API key. Only the sha256 of the key is stored; the admin key lives in settings."""

    __tablename__ = "api_keys"

    id: Mapped[str] = _pk("api_key")
    tenant_id: Mapped[str] = _fk("tenants.id", "CASCADE")
    key_hash: Mapped[str] = mapped_column(SHA256, unique=True)
    key_prefix: Mapped[str] = mapped_column(sa.String(16))  # first 8 characters, for display
    scopes: Mapped[str] = mapped_column(sa.String(200))  # comma-separated, e.g. "inference,manage"
    created_at: Mapped[datetime] = _created_at()
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (sa.Index(None, "tenant_id"),)


class EndUser(Base):
    """A user of a tenant's application, known by the application's own id for them."""

    __tablename__ = "end_users"

    id: Mapped[str] = _pk("end_user")
    tenant_id: Mapped[str] = _fk("tenants.id", "CASCADE")
    external_id: Mapped[str] = mapped_column(sa.String(200))
    created_at: Mapped[datetime] = _created_at()

    examples: Mapped[list[UserExample]] = relationship(
        back_populates="end_user", passive_deletes=True, order_by="UserExample.created_at"
    )

    __table_args__ = (sa.UniqueConstraint("tenant_id", "external_id"),)


class UserExample(Base):
    """One training example an application posted for an end user (a chat or prompt/completion record)."""

    __tablename__ = "user_examples"

    id: Mapped[str] = _pk("user_example")
    end_user_id: Mapped[str] = _fk("end_users.id", "CASCADE")
    data: Mapped[Any] = _json()
    created_at: Mapped[datetime] = _created_at()

    end_user: Mapped[EndUser] = relationship(back_populates="examples")

    __table_args__ = (sa.Index(None, "end_user_id"),)


class Prefix(Base):
    """A named virtual model of a tenant. A personal prefix has `end_user_id` set and the name
    `user:<external id>`; the check constraint keeps that name form reserved for personal prefixes."""

    __tablename__ = "prefixes"

    id: Mapped[str] = _pk("prefix")
    tenant_id: Mapped[str] = _fk("tenants.id", "CASCADE")
    name: Mapped[str] = mapped_column(sa.String(200))
    end_user_id: Mapped[str | None] = _fk("end_users.id", "CASCADE", nullable=True)
    created_at: Mapped[datetime] = _created_at()

    versions: Mapped[list[PrefixVersion]] = relationship(
        back_populates="prefix", passive_deletes=True, order_by="PrefixVersion.version"
    )

    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "name"),
        sa.Index(None, "end_user_id"),
        # substr, not LIKE: LIKE is case-insensitive on SQLite and case-sensitive on PostgreSQL.
        sa.CheckConstraint("(end_user_id IS NULL) = (substr(name, 1, 5) <> 'user:')", name="personal_name"),
    )


class PrefixVersion(Base):
    """One immutable uploaded or trained version of a prefix; its tensors are the blob named by sha256."""

    __tablename__ = "prefix_versions"

    id: Mapped[str] = _pk("prefix_version")
    prefix_id: Mapped[str] = _fk("prefixes.id", "CASCADE")
    version: Mapped[int] = mapped_column(sa.Integer)
    sha256: Mapped[str] = mapped_column(SHA256)
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    num_virtual_tokens: Mapped[int] = mapped_column(sa.Integer)
    source_format: Mapped[str] = mapped_column(sa.String(16))  # one of SOURCE_FORMATS
    kind: Mapped[str] = mapped_column(sa.String(16), default="prefix_tuning", server_default="prefix_tuning")
    base_model_fingerprint: Mapped[str] = mapped_column(sa.String(128))
    # What a PEFT adapter's `base_model_name_or_path` said; None for native and trained prefixes.
    recorded_base_model: Mapped[str | None] = mapped_column(sa.String(500))
    created_at: Mapped[datetime] = _created_at()
    # Provenance only, deliberately no FK: training_jobs.result_prefix_version_id is the FK of this pair
    # (a foreign-key cycle would need deferred constraints and ALTERs on SQLite).
    training_job_id: Mapped[str | None] = mapped_column(sa.String(64))

    prefix: Mapped[Prefix] = relationship(back_populates="versions")

    __table_args__ = (
        sa.UniqueConstraint("prefix_id", "version"),
        sa.Index(None, "sha256"),
        sa.CheckConstraint("version >= 1", name="version_positive"),
        sa.CheckConstraint(f"source_format IN {SOURCE_FORMATS!r}", name="source_format"),
        sa.CheckConstraint(f"kind IN {PREFIX_KINDS!r}", name="kind"),
    )


class File(Base):
    """An uploaded file (OpenAI Files API), e.g. JSONL training data; the bytes are the blob `sha256`."""

    __tablename__ = "files"

    id: Mapped[str] = _pk("file")
    tenant_id: Mapped[str] = _fk("tenants.id", "CASCADE")
    filename: Mapped[str] = mapped_column(sa.String(255))
    purpose: Mapped[str] = mapped_column(sa.String(32))
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(SHA256)
    line_count: Mapped[int] = mapped_column(sa.Integer)
    status: Mapped[str] = mapped_column(sa.String(32))
    created_at: Mapped[datetime] = _created_at()

    __table_args__ = (sa.Index(None, "tenant_id", "created_at"), sa.Index(None, "sha256"))


class TrainingJob(Base):
    """A fine-tuning (prefix-tuning) job; a personalization job has `end_user_id` set."""

    __tablename__ = "training_jobs"

    id: Mapped[str] = _pk("training_job")
    tenant_id: Mapped[str] = _fk("tenants.id", "CASCADE")
    status: Mapped[str] = mapped_column(sa.String(32))  # one of JOB_STATUSES
    model: Mapped[str] = mapped_column(sa.String(200))
    training_file_id: Mapped[str | None] = _fk("files.id", "SET NULL", nullable=True)
    validation_file_id: Mapped[str | None] = _fk("files.id", "SET NULL", nullable=True)
    # SET NULL, not CASCADE: deleting an end user keeps the tenant's record of the job (and its usage).
    end_user_id: Mapped[str | None] = _fk("end_users.id", "SET NULL", nullable=True)
    prefix_name: Mapped[str] = mapped_column(sa.String(200))
    hyperparameters: Mapped[dict[str, Any]] = _json()
    options: Mapped[dict[str, Any]] = _json()  # num_virtual_tokens, prefix_projection, warm start
    result_prefix_version_id: Mapped[str | None] = _fk("prefix_versions.id", "SET NULL", nullable=True)
    error: Mapped[dict[str, Any] | None] = _json(nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(sa.BigInteger)
    queue_job_id: Mapped[str | None] = mapped_column(sa.String(200))
    created_at: Mapped[datetime] = _created_at()
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

    id: Mapped[str] = _pk("job_event")
    job_id: Mapped[str] = _fk("training_jobs.id", "CASCADE")
    created_at: Mapped[datetime] = _created_at()
    level: Mapped[str] = mapped_column(sa.String(16))  # "info" | "warn" | "error"
    message: Mapped[str] = mapped_column(sa.Text)
    data: Mapped[dict[str, Any] | None] = _json(nullable=True)

    job: Mapped[TrainingJob] = relationship(back_populates="events")

    __table_args__ = (sa.Index(None, "job_id", "created_at"),)


class JobCheckpoint(Base):
    """A prefix saved during training (OpenAI fine_tuning.job.checkpoint); the tensors are the blob sha256."""

    __tablename__ = "job_checkpoints"

    id: Mapped[str] = _pk("job_checkpoint")
    job_id: Mapped[str] = _fk("training_jobs.id", "CASCADE")
    step: Mapped[int] = mapped_column(sa.Integer)
    metrics: Mapped[dict[str, Any]] = _json()
    sha256: Mapped[str] = mapped_column(SHA256)
    created_at: Mapped[datetime] = _created_at()

    job: Mapped[TrainingJob] = relationship(back_populates="checkpoints")

    __table_args__ = (sa.UniqueConstraint("job_id", "step"), sa.Index(None, "sha256"))


class TenantLimits(Base):
    """A tenant's own limits; a NULL column (or no row at all) means the default from Settings.

    Rates are enforced through Redis (or in process), counts and bytes by queries when something is created
    (see app/services/limits.py). One row per tenant, deleted with it.
    """

    __tablename__ = "tenant_limits"

    tenant_id: Mapped[str] = mapped_column(
        sa.String(64), sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    requests_per_minute: Mapped[int | None] = mapped_column(sa.Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(sa.BigInteger)  # generated (completion) tokens
    max_concurrent_requests: Mapped[int | None] = mapped_column(sa.Integer)
    max_prefixes: Mapped[int | None] = mapped_column(sa.Integer)
    max_stored_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)  # prefix versions + files
    max_concurrent_jobs: Mapped[int | None] = mapped_column(sa.Integer)
    max_examples_per_user: Mapped[int | None] = mapped_column(sa.Integer)
    max_concurrent_batches: Mapped[int | None] = mapped_column(sa.Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Batch(Base):
    """A Batch API batch (`/v1/batches`): the requests of an input file, run in the background at batch priority.

    A server's batch runner holds the batch while it runs it: `lease_token` (set by its claim), refreshed through
    `heartbeat_at`; every write of the runner is conditional on its token, and a batch whose heartbeat went stale
    is claimed by another runner (app/batches/store.py).
    """

    __tablename__ = "batches"

    id: Mapped[str] = _pk("batch")
    tenant_id: Mapped[str] = _fk("tenants.id", "CASCADE")
    endpoint: Mapped[str] = mapped_column(sa.String(64))
    # No foreign keys to files: OpenAI keeps showing a deleted file's id (an input file is kept while it runs).
    input_file_id: Mapped[str] = mapped_column(sa.String(64))
    input_sha256: Mapped[str] = mapped_column(SHA256)
    completion_window: Mapped[str] = mapped_column(sa.String(16))
    status: Mapped[str] = mapped_column(sa.String(16))  # one of BATCH_STATUSES
    user_metadata: Mapped[dict[str, str] | None] = _json(nullable=True)  # the client's `metadata`
    errors: Mapped[list[dict[str, Any]] | None] = _json(nullable=True)  # {code, message, param, line}
    total: Mapped[int] = mapped_column(sa.Integer)
    completed: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    failed: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    output_file_id: Mapped[str | None] = mapped_column(sa.String(64))
    error_file_id: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = _created_at()
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
        sa.String(64), sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    line: Mapped[int] = mapped_column(sa.Integer, primary_key=True)  # 1-based line of the input file
    ok: Mapped[bool] = mapped_column(sa.Boolean)  # a 2xx answer (output file), else the error file
    record: Mapped[str] = mapped_column(sa.Text)  # the output line's JSON
