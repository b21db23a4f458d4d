"""Uploaded files (OpenAI Files API): training data and batch input, their bytes a blob."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from app.db.models.base import SHA256, Base, created_at_column, fk_column, pk_column


class File(Base):
    """An uploaded file (OpenAI Files API), e.g. JSONL training data; the bytes are the blob `sha256`."""

    __tablename__ = "files"

    id: Mapped[str] = pk_column("file")
    tenant_id: Mapped[str] = fk_column("tenants.id", "CASCADE")
    filename: Mapped[str] = mapped_column(sa.String(255))
    purpose: Mapped[str] = mapped_column(sa.String(32))
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(SHA256)
    line_count: Mapped[int] = mapped_column(sa.Integer)
    status: Mapped[str] = mapped_column(sa.String(32))
    created_at: Mapped[datetime] = created_at_column()

    __table_args__ = (sa.Index(None, "tenant_id", "created_at"), sa.Index(None, "sha256"))
