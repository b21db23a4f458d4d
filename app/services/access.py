"""Who is calling, within which limits, and which prefix version `model` names: one query.

Every request authenticates, every tenant request reads its limits, and every inference request resolves its
`model`. Done as three queries that was three database round trips per request on the hot path; here they are
one statement (the key joined to the tenant's limits row and, when asked, to the named prefix version, or to
each version of a stack of prefixes, with the base each was trained on top of), read
fresh on every request so a revoked key, a deleted prefix or a new version takes effect on every replica as
soon as it commits. No torch here: the web layer imports this module.
"""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from app.config import Settings
from app.db.models import ApiKey, Prefix, PrefixVersion, TenantLimits, TrainingJob, utcnow
from app.services.auth import Principal, hash_key
from app.services.limits import LIMIT_FIELDS, Limits, over_defaults
from app.services.stacks import ModelQuery, StackLimits, StackQuery
from prefix_store.ref import ON_TOP_OF_KEY, PrefixRef, bases_from_json

__all__ = ["Access", "ModelQuery", "StackQuery", "admin_access", "authorize"]

TOUCH_EVERY_S: Final = 60.0  # a key's last_used_at is written at most this often (per process)


@dataclass(frozen=True)
class Access:
    """The caller, its effective limits (None for the admin key) and, when asked, the versions its `model` named:
    `looked_up` the parts asked for, `found` one entry per part, None where the tenant has no such prefix or
    version (another tenant's is never found). `stacking`: the limits on a stack of prefixes."""

    principal: Principal
    limits: Limits | None
    looked_up: StackQuery | None = None  # what `found` answers
    found: tuple[PrefixRef | None, ...] = ()
    stacking: StackLimits = field(default_factory=StackLimits)


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


Shape = tuple[bool, ...]
"""Per part of the named stack: True for a pinned version (`name@3`), False for the newest (`name`)."""


@lru_cache(maxsize=256)  # bounded: a client chooses the shape (2 + 4 + 8 + 16 of them with the default 4 parts)
def _build(shape: Shape) -> sa.Select[Any]:
    """The statement, with bind parameters `key_hash` and, for part i, `name_i` and (pinned) `version_i`: built
    once per shape (building it per request showed in the server's profile). Each part is outer-joined on
    unique keys ((tenant, name), then (prefix, version), then the job by its id), so the statement returns one
    row whatever is missing; the job's options hold the base a trained version was made on top of."""
    cols: list[Any] = [ApiKey.id, ApiKey.tenant_id, ApiKey.scopes, ApiKey.last_used_at]
    cols += [getattr(TenantLimits, f).label(f"limit_{f}") for f in LIMIT_FIELDS]
    stmt = (sa.select(*cols).select_from(ApiKey)
            .outerjoin(TenantLimits, TenantLimits.tenant_id == ApiKey.tenant_id)
            .where(ApiKey.key_hash == sa.bindparam("key_hash"), ApiKey.revoked_at.is_(None)))
    for i, pinned in enumerate(shape):
        prefix, ver, job, newest = aliased(Prefix), aliased(PrefixVersion), aliased(TrainingJob), aliased(PrefixVersion)
        version: Any = sa.bindparam(f"version_{i}") if pinned else (
            sa.select(sa.func.max(newest.version)).where(newest.prefix_id == prefix.id).scalar_subquery())
        stmt = (stmt.add_columns(prefix.id.label(f"prefix_id_{i}"), prefix.created_at.label(f"prefix_created_at_{i}"),
                                 ver.version.label(f"version_{i}"), ver.sha256.label(f"sha256_{i}"),
                                 ver.num_virtual_tokens.label(f"num_virtual_tokens_{i}"),
                                 ver.base_model_fingerprint.label(f"fingerprint_{i}"), ver.kind.label(f"kind_{i}"),
                                 ver.created_at.label(f"v_created_at_{i}"), job.options.label(f"job_options_{i}"))
                .outerjoin(prefix, sa.and_(prefix.tenant_id == ApiKey.tenant_id,
                                           prefix.name == sa.bindparam(f"name_{i}")))
                .outerjoin(ver, sa.and_(ver.prefix_id == prefix.id, ver.version == version))
                .outerjoin(job, job.id == ver.training_job_id))
    return stmt


for _shape in ((), (False,), (True,)):  # the common shapes, built at import
    _build(_shape)


def _statement(key_hash: str, model: StackQuery | None) -> tuple[sa.Select[Any], dict[str, Any]]:
    params: dict[str, Any] = {"key_hash": key_hash}
    for i, part in enumerate(model or ()):
        params[f"name_{i}"] = part.name
        if part.version is not None:
            params[f"version_{i}"] = part.version
    return _build(tuple(part.version is not None for part in model or ())), params


def _found(row: Any, i: int, name: str) -> PrefixRef | None:
    if getattr(row, f"version_{i}") is None:
        return None
    options = getattr(row, f"job_options_{i}")
    return PrefixRef(tenant_id=row.tenant_id, prefix_id=getattr(row, f"prefix_id_{i}"), name=name,
                     version=int(getattr(row, f"version_{i}")), sha256=getattr(row, f"sha256_{i}"),
                     num_virtual_tokens=int(getattr(row, f"num_virtual_tokens_{i}")),
                     base_model_fingerprint=getattr(row, f"fingerprint_{i}"),
                     created_at=getattr(row, f"v_created_at_{i}"),
                     prefix_created_at=getattr(row, f"prefix_created_at_{i}"),
                     on_top_of=bases_from_json((options or {}).get(ON_TOP_OF_KEY)),
                     kind=getattr(row, f"kind_{i}"))


def admin_access(raw_key: str, admin_key: str | None) -> Access | None:
    """The platform admin's access when `raw_key` is the admin key (compared in constant time; no query)."""
    if admin_key and hmac.compare_digest(raw_key.encode(), admin_key.encode()):
        return Access(Principal(tenant_id=None, scopes=frozenset({"admin"})), limits=None)
    return None


def authorize(session: Session, *, raw_key: str, admin_key: str | None, settings: Settings,
              model: StackQuery | None = None) -> Access | None:
    """The access a bearer key gives, or None for an unknown or revoked key; with `model`, the version each part
    of the named stack (one part for a single prefix) resolves to.

    A tenant key is found by its hash (the hash of a guess reveals nothing about stored keys). One statement,
    whatever the number of parts; a second (an UPDATE) at most once a minute per key and process, to keep
    last_used_at.
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
    found = tuple(_found(row, i, part.name) for i, part in enumerate(model or ()))
    return Access(principal, limits=over_defaults(own, settings), looked_up=model, found=found,
                  stacking=StackLimits.of(settings))
