"""Prefixes (named virtual models) and their immutable versions."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.models.base import PREFIX_KINDS, SHA256, SOURCE_FORMATS, Base, created_at_column, fk_column, pk_column


class Prefix(Base):
    """A named virtual model of a tenant. A personal prefix has `end_user_id` set and the name
    `user:<external id>`; the check constraint keeps that name form reserved for personal prefixes."""

    __tablename__ = "prefixes"

    id: Mapped[str] = pk_column("prefix")
    tenant_id: Mapped[str] = fk_column("tenants.id", "CASCADE")
    name: Mapped[str] = mapped_column(sa.String(200))
    end_user_id: Mapped[str | None] = fk_column("end_users.id", "CASCADE", nullable=True)
    created_at: Mapped[datetime] = created_at_column()

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

    id: Mapped[str] = pk_column("prefix_version")
    prefix_id: Mapped[str] = fk_column("prefixes.id", "CASCADE")
    version: Mapped[int] = mapped_column(sa.Integer)
    sha256: Mapped[str] = mapped_column(SHA256)
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    num_virtual_tokens: Mapped[int] = mapped_column(sa.Integer)
    source_format: Mapped[str] = mapped_column(sa.String(16))  # one of SOURCE_FORMATS
    kind: Mapped[str] = mapped_column(sa.String(16), default="prefix_tuning", server_default="prefix_tuning")
    base_model_fingerprint: Mapped[str] = mapped_column(sa.String(128))
    # What a PEFT adapter's `base_model_name_or_path` said; None for native and trained prefixes.
    recorded_base_model: Mapped[str | None] = mapped_column(sa.String(500))
    created_at: Mapped[datetime] = created_at_column()
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
