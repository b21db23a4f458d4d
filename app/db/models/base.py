"""What every table shares: the declarative base, its naming convention, UTC datetimes, the status and kind
vocabularies, and one helper per recurring column shape."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

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
BATCH_STATUSES: Final = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
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
def pk_column(kind: IdKind) -> Mapped[str]:
    return mapped_column(sa.String(64), primary_key=True, default=lambda: new_id(kind))


def fk_column(target: str, ondelete: str, *, nullable: bool = False) -> Mapped[Any]:
    return mapped_column(sa.String(64), sa.ForeignKey(target, ondelete=ondelete), nullable=nullable)


def created_at_column() -> Mapped[datetime]:
    return mapped_column(UTCDateTime(), default=utcnow)


def json_column(*, nullable: bool = False) -> Mapped[Any]:
    # none_as_null: a Python None is SQL NULL, not the JSON literal `null`.
    return mapped_column(sa.JSON(none_as_null=True), nullable=nullable)


SHA256 = sa.String(64)  # lowercase hex
