"""The database as the resolver's catalog: (tenant, name, version) → the committed prefix version."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Prefix, PrefixVersion
from prefix_store.resolver import PrefixRef


class DbCatalog:
    """Looks prefixes up in the database on every call, so a delete is effective as soon as it commits."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def lookup(self, tenant_id: str, name: str, version: int | None) -> PrefixRef | None:
        stmt = (
            sa.select(
                Prefix.id, PrefixVersion.version, PrefixVersion.sha256, PrefixVersion.num_virtual_tokens
            )
            .join(PrefixVersion, PrefixVersion.prefix_id == Prefix.id)
            .where(Prefix.tenant_id == tenant_id, Prefix.name == name)
        )
        if version is None:
            stmt = stmt.order_by(PrefixVersion.version.desc()).limit(1)
        else:
            stmt = stmt.where(PrefixVersion.version == version)
        with self._sessions() as session:
            row = session.execute(stmt).first()
        if row is None:
            return None
        return PrefixRef(
            tenant_id=tenant_id,
            prefix_id=row.id,
            name=name,
            version=row.version,
            sha256=row.sha256,
            num_virtual_tokens=row.num_virtual_tokens,
        )
