"""Tenants and what belongs to them directly: API keys, end users and their examples, limits."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.models.base import SHA256, Base, UTCDateTime, created_at_column, fk_column, json_column, pk_column, utcnow


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = pk_column("tenant")
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    created_at: Mapped[datetime] = created_at_column()


class ApiKey(Base):
    """A tenant's API key. Only the sha256 of the key is stored; the admin key lives in settings."""

    __tablename__ = "api_keys"

    id: Mapped[str] = pk_column("api_key")
    tenant_id: Mapped[str] = fk_column("tenants.id", "CASCADE")
    key_hash: Mapped[str] = mapped_column(SHA256, unique=True)
    key_prefix: Mapped[str] = mapped_column(sa.String(16))  # first 8 characters, for display
    scopes: Mapped[str] = mapped_column(sa.String(200))  # comma-separated, e.g. "inference,manage"
    created_at: Mapped[datetime] = created_at_column()
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (sa.Index(None, "tenant_id"),)


class EndUser(Base):
    """A user of a tenant's application, known by the application's own id for them."""

    __tablename__ = "end_users"

    id: Mapped[str] = pk_column("end_user")
    tenant_id: Mapped[str] = fk_column("tenants.id", "CASCADE")
    external_id: Mapped[str] = mapped_column(sa.String(200))
    created_at: Mapped[datetime] = created_at_column()

    examples: Mapped[list[UserExample]] = relationship(
        back_populates="end_user", passive_deletes=True, order_by="UserExample.created_at"
    )

    __table_args__ = (sa.UniqueConstraint("tenant_id", "external_id"),)


class UserExample(Base):
    """One training example an application posted for an end user (a chat or prompt/completion record)."""

    __tablename__ = "user_examples"

    id: Mapped[str] = pk_column("user_example")
    end_user_id: Mapped[str] = fk_column("end_users.id", "CASCADE")
    data: Mapped[Any] = json_column()
    created_at: Mapped[datetime] = created_at_column()

    end_user: Mapped[EndUser] = relationship(back_populates="examples")

    __table_args__ = (sa.Index(None, "end_user_id"),)


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
