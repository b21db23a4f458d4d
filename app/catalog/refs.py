"""Naming a prefix version: the `name@version` parser and the one (tenant, name, version) → version query.

Serving (`model`), `GET /v1/models/{model}`, warm starts, prefix management and the resolver's catalog all go
through these two, so they agree on what a reference means and on what another tenant's prefix looks like
(exactly like a missing one); `find_versions` looks up every part of a stack of prefixes in one statement. A
version a training job published reads the base it was trained on top of from that job's options. No torch here:
the web layer imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased, sessionmaker

from app.db.models import PERSONAL_PREFIX_PREFIX, Prefix, PrefixVersion, TrainingJob
from prefix_store.ref import ON_TOP_OF_KEY, PrefixRef, bases_from_json

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


_COLUMNS: Final = (Prefix.id, Prefix.created_at.label("prefix_created_at"), PrefixVersion.version,
                   PrefixVersion.sha256, PrefixVersion.num_virtual_tokens, PrefixVersion.base_model_fingerprint,
                   PrefixVersion.created_at, PrefixVersion.kind, TrainingJob.options.label("job_options"))


def _versions(tenant_id: str, name: str) -> sa.Select[Any]:
    """The tenant's versions of `name`, with the options of the job that published each (for its base)."""
    return (sa.select(*_COLUMNS).join(PrefixVersion, PrefixVersion.prefix_id == Prefix.id)
            .outerjoin(TrainingJob, TrainingJob.id == PrefixVersion.training_job_id)
            .where(Prefix.tenant_id == tenant_id, Prefix.name == name))


def _ref(row: Any, tenant_id: str, name: str) -> PrefixRef:
    return PrefixRef(tenant_id=tenant_id, prefix_id=row.id, name=name, version=int(row.version), sha256=row.sha256,
                     num_virtual_tokens=int(row.num_virtual_tokens), base_model_fingerprint=row.base_model_fingerprint,
                     created_at=row.created_at, prefix_created_at=row.prefix_created_at,
                     on_top_of=bases_from_json((row.job_options or {}).get(ON_TOP_OF_KEY)), kind=row.kind)


def find_version(session: Session, *, tenant_id: str, name: str, version: int | None) -> PrefixRef | None:
    """The tenant's prefix `name` (personal ones included) at `version`, or its newest version when None.
    None when the tenant has no such prefix or version; another tenant's prefix is never found."""
    stmt = _versions(tenant_id, name)
    stmt = (stmt.where(PrefixVersion.version == version) if version is not None
            else stmt.order_by(PrefixVersion.version.desc()))
    row = session.execute(stmt.limit(1)).first()
    return None if row is None else _ref(row, tenant_id, name)


def find_versions(session: Session, *, tenant_id: str,
                  parts: Sequence[tuple[str, int | None]]) -> tuple[PrefixRef | None, ...]:
    """`find_version` for each (name, version) of a stack, in ONE statement (a UNION ALL of one lookup per part,
    each tagged with its index); None where a part is missing."""
    if not parts:
        return ()
    selects = []
    for i, (name, version) in enumerate(parts):
        stmt = _versions(tenant_id, name).add_columns(sa.literal(i).label("part"))
        if version is not None:
            stmt = stmt.where(PrefixVersion.version == version)
        else:
            other = aliased(PrefixVersion)
            newest = sa.select(sa.func.max(other.version)).where(other.prefix_id == Prefix.id).scalar_subquery()
            stmt = stmt.where(PrefixVersion.version == newest)
        selects.append(stmt)
    rows = session.execute(sa.union_all(*selects) if len(selects) > 1 else selects[0]).all()
    by_part = {int(row.part): row for row in rows}
    return tuple(_ref(by_part[i], tenant_id, name) if i in by_part else None for i, (name, _) in enumerate(parts))


class DbCatalog:
    """The database as the resolver's catalog. Looks prefixes up on every call, so a delete is effective as soon
    as it commits."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def lookup(self, tenant_id: str, name: str, version: int | None) -> PrefixRef | None:
        with self._sessions() as session:
            return find_version(session, tenant_id=tenant_id, name=name, version=version)
