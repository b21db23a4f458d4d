"""Naming a prefix version: the `name@version` parser and the one (tenant, name, version) → version query.

Serving (`model`), `GET /v1/models/{model}`, warm starts, prefix management and the resolver's catalog all go
through these two, so they agree on what a reference means and on what another tenant's prefix looks like
(exactly like a missing one). No torch here: the web layer imports this module.
"""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import PERSONAL_PREFIX_PREFIX, Prefix, PrefixVersion
from prefix_store.ref import PrefixRef

MAX_VERSION: Final = 2**31 - 1  # the column is a 32-bit integer; a larger one can only be malformed


class InvalidRef(ValueError):
    """A `name@version` whose version is not a positive integer."""


def split_ref(ref: str) -> tuple[str, int | None]:
    """`name` → (name, None); `name@3` → (name, 3); raise InvalidRef for `name@0`, `name@-1`, `name@x`, `name@`.

    An end user's personal prefix (`user:<external id>`) may contain `@` itself (ids never end in `@<digits>`),
    so in a personal name only a trailing `@<digits>` is a version.
    """
    name, sep, raw = ref.rpartition("@")
    if not sep:
        return ref, None
    digits = raw.isascii() and raw.isdigit() and len(raw) <= len(str(MAX_VERSION))
    if digits and 1 <= int(raw) <= MAX_VERSION:
        return name, int(raw)
    if not digits and ref.startswith(PERSONAL_PREFIX_PREFIX):
        return ref, None
    raise InvalidRef(f"invalid version {raw[:20]!r} in {ref[:100]!r}: expected name@<positive integer>")


def find_version(session: Session, *, tenant_id: str, name: str, version: int | None) -> PrefixRef | None:
    """The tenant's prefix `name` (personal ones included) at `version`, or its newest version when None.
    None when the tenant has no such prefix or version; another tenant's prefix is never found."""
    stmt = (
        sa.select(Prefix.id, Prefix.created_at.label("prefix_created_at"), PrefixVersion.version,
                  PrefixVersion.sha256, PrefixVersion.num_virtual_tokens, PrefixVersion.base_model_fingerprint,
                  PrefixVersion.created_at)
        .join(PrefixVersion, PrefixVersion.prefix_id == Prefix.id)
        .where(Prefix.tenant_id == tenant_id, Prefix.name == name)
    )
    stmt = (stmt.where(PrefixVersion.version == version) if version is not None
            else stmt.order_by(PrefixVersion.version.desc()))
    row = session.execute(stmt.limit(1)).first()
    if row is None:
        return None
    return PrefixRef(tenant_id=tenant_id, prefix_id=row.id, name=name, version=int(row.version), sha256=row.sha256,
                     num_virtual_tokens=int(row.num_virtual_tokens), base_model_fingerprint=row.base_model_fingerprint,
                     created_at=row.created_at, prefix_created_at=row.prefix_created_at)


class DbCatalog:
    """The database as the resolver's catalog. Looks prefixes up on every call, so a delete is effective as soon
    as it commits."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def lookup(self, tenant_id: str, name: str, version: int | None) -> PrefixRef | None:
        with self._sessions() as session:
            return find_version(session, tenant_id=tenant_id, name=name, version=version)
