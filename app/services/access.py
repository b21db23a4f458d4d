"""Who is calling, within which limits, and which prefix version `model` names: one query.

Every request authenticates, every tenant request reads its limits, and every inference request resolves its
`model`. Done as three queries that was three database round trips per request on the hot path; here they are
one statement (the key joined to the tenant's limits row and, when asked, to the named prefix version), read
fresh on every request so a revoked key, a deleted prefix or a new version takes effect on every replica as
soon as it commits. No torch here: the web layer imports this module.
"""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from app.config import Settings
from app.db.models import ApiKey, Prefix, PrefixVersion, TenantLimits, utcnow
from app.services.auth import Principal, hash_key
from app.services.limits import LIMIT_FIELDS, Limits, over_defaults
from prefix_store.ref import PrefixRef

TOUCH_EVERY_S: Final = 60.0  # a key's last_used_at is written at most this often (per process)


@dataclass(frozen=True)
class ModelQuery:
    """The prefix version to look up with the key: `name` at `version` (None: the newest)."""

    name: str
    version: int | None


@dataclass(frozen=True)
class Access:
    """The caller, its effective limits (None for the admin key) and, when asked, the version it named
    (None when the tenant has no such prefix or version: another tenant's is never found)."""

    principal: Principal
    limits: Limits | None
    looked_up: ModelQuery | None = None  # what `found` answers
    found: PrefixRef | None = None


class _Touched:
    """When this process last wrote each key's last_used_at: a burst on one key writes it once, not once per
    request (on SQLite every write takes the database's one write lock)."""

    def __init__(self) -> None:
        self._at: dict[str, float] = {}
        self._lock = threading.Lock()

    def due(self, key_id: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._at.get(key_id, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
                return False
            if len(self._at) > 100_000:  # bounded: forgetting only costs one more write
                self._at.clear()
            self._at[key_id] = now
            return True


_touched = _Touched()


def _build(model: Literal["none", "version", "newest"]) -> sa.Select[Any]:
    """The statement, with bind parameters `key_hash`, `name` and `version`: built once per shape at import
    (building it per request showed in the server's profile)."""
    cols: list[Any] = [ApiKey.id, ApiKey.tenant_id, ApiKey.scopes, ApiKey.last_used_at]
    cols += [getattr(TenantLimits, f).label(f"limit_{f}") for f in LIMIT_FIELDS]
    stmt = (sa.select(*cols).select_from(ApiKey)
            .outerjoin(TenantLimits, TenantLimits.tenant_id == ApiKey.tenant_id)
            .where(ApiKey.key_hash == sa.bindparam("key_hash"), ApiKey.revoked_at.is_(None)))
    if model == "none":
        return stmt
    newest = aliased(PrefixVersion)
    version: Any = sa.bindparam("version") if model == "version" else (
        sa.select(sa.func.max(newest.version)).where(newest.prefix_id == Prefix.id).scalar_subquery())
    return (stmt.add_columns(Prefix.id.label("prefix_id"), Prefix.created_at.label("prefix_created_at"),
                             PrefixVersion.version, PrefixVersion.sha256, PrefixVersion.num_virtual_tokens,
                             PrefixVersion.base_model_fingerprint, PrefixVersion.created_at.label("v_created_at"))
            .outerjoin(Prefix, sa.and_(Prefix.tenant_id == ApiKey.tenant_id, Prefix.name == sa.bindparam("name")))
            .outerjoin(PrefixVersion, sa.and_(PrefixVersion.prefix_id == Prefix.id,
                                              PrefixVersion.version == version)))


_STATEMENTS: Final = {shape: _build(shape) for shape in ("none", "version", "newest")}


def _statement(key_hash: str, model: ModelQuery | None) -> tuple[sa.Select[Any], dict[str, Any]]:
    if model is None:
        return _STATEMENTS["none"], {"key_hash": key_hash}
    if model.version is None:
        return _STATEMENTS["newest"], {"key_hash": key_hash, "name": model.name}
    return _STATEMENTS["version"], {"key_hash": key_hash, "name": model.name, "version": model.version}


def _found(row: Any, name: str) -> PrefixRef | None:
    if row.version is None:
        return None
    return PrefixRef(tenant_id=row.tenant_id, prefix_id=row.prefix_id, name=name, version=int(row.version),
                     sha256=row.sha256, num_virtual_tokens=int(row.num_virtual_tokens),
                     base_model_fingerprint=row.base_model_fingerprint, created_at=row.v_created_at,
                     prefix_created_at=row.prefix_created_at)


def admin_access(raw_key: str, admin_key: str | None) -> Access | None:
    """The platform admin's access when `raw_key` is the admin key (compared in constant time; no query)."""
    if admin_key and hmac.compare_digest(raw_key.encode(), admin_key.encode()):
        return Access(Principal(tenant_id=None, scopes=frozenset({"admin"})), limits=None)
    return None


def authorize(session: Session, *, raw_key: str, admin_key: str | None, settings: Settings,
              model: ModelQuery | None = None) -> Access | None:
    """The access a bearer key gives, or None for an unknown or revoked key.

    A tenant key is found by its hash (the hash of a guess reveals nothing about stored keys). One statement;
    a second (an UPDATE) at most once a minute per key and process, to keep last_used_at.
    """
    admin = admin_access(raw_key, admin_key)
    if admin is not None:
        return admin
    stmt, params = _statement(hash_key(raw_key), model)
    row = session.execute(stmt, params).first()
    if row is None:
        return None
    if _touched.due(row.id):
        session.execute(sa.update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=utcnow()))
        session.commit()
    principal = Principal(tenant_id=row.tenant_id, scopes=frozenset(row.scopes.split(",")), key_id=row.id)
    own = {f: getattr(row, f"limit_{f}") for f in LIMIT_FIELDS}
    return Access(principal, limits=over_defaults(own, settings), looked_up=model,
                  found=_found(row, model.name) if model is not None else None)
