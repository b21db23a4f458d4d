"""Tenants and their API keys (platform admin operations). Keyword-only functions over a Session.

Deleting a tenant deletes its rows by database cascade, then the blobs nobody references any more, then
frees its prefixes from the cache tiers. Blobs are content-addressed and shared across tenants, so a blob
another tenant (or a file, or a checkpoint) still points to stays.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import ApiKey, File, JobCheckpoint, Prefix, PrefixVersion, Tenant, TrainingJob, utcnow
from app.errors import Conflict, NotFound
from app.protocol.admin import KeyCreated, KeyInfo, Scope, TenantCreated, TenantInfo
from app.services.auth import generate_key, hash_key
from app.services.prefixes import PrefixStores, delete_unreferenced_blobs

log = logging.getLogger(__name__)

TENANT_KEY_SCOPES: tuple[Scope, ...] = ("inference", "manage")


def _key_row(tenant_id: str, scopes: list[Scope]) -> tuple[ApiKey, str]:
    raw = generate_key()
    ordered = sorted(set(scopes))
    row = ApiKey(tenant_id=tenant_id, key_hash=hash_key(raw), key_prefix=raw[:8], scopes=",".join(ordered))
    return row, raw


def _key_info(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        id=row.id, tenant_id=row.tenant_id, key_prefix=row.key_prefix, scopes=row.scopes.split(","),
        created_at=row.created_at, revoked_at=row.revoked_at, last_used_at=row.last_used_at,
    )


def create_tenant(*, session: Session, name: str) -> TenantCreated:
    """A new tenant with one key holding inference + manage; Conflict if the name is taken."""
    name = name.strip()
    if session.execute(sa.select(Tenant.id).where(Tenant.name == name)).first() is not None:
        raise Conflict(f"a tenant named {name!r} already exists", param="name", code="tenant_exists")
    tenant = Tenant(name=name)
    session.add(tenant)
    try:
        session.flush()  # assigns tenant.id
        key, raw = _key_row(tenant.id, list(TENANT_KEY_SCOPES))
        session.add(key)
        session.commit()
    except IntegrityError:  # a concurrent create of the same name won the race
        session.rollback()
        raise Conflict(f"a tenant named {name!r} already exists", param="name",
                       code="tenant_exists") from None
    log.info("created tenant %s (%s)", tenant.id, name)
    return TenantCreated(id=tenant.id, name=tenant.name, api_key=raw, api_key_id=key.id,
                         created_at=tenant.created_at)


def list_tenants(*, session: Session) -> list[TenantInfo]:
    """Every tenant, oldest first."""
    rows = session.execute(sa.select(Tenant).order_by(Tenant.created_at, Tenant.id)).scalars()
    return [TenantInfo(id=t.id, name=t.name, created_at=t.created_at) for t in rows]


def _tenant(session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    return tenant


def delete_tenant(*, session: Session, stores: PrefixStores, tenant_id: str) -> None:
    """Delete the tenant and everything it owns (rows, now-unreferenced blobs, cached prefixes)."""
    _tenant(session, tenant_id)
    prefix_ids = list(session.execute(sa.select(Prefix.id).where(Prefix.tenant_id == tenant_id)).scalars())
    shas = set(
        session.execute(
            sa.select(PrefixVersion.sha256).join(Prefix, Prefix.id == PrefixVersion.prefix_id)
            .where(Prefix.tenant_id == tenant_id)
        ).scalars()
    )
    shas.update(session.execute(sa.select(File.sha256).where(File.tenant_id == tenant_id)).scalars())
    shas.update(
        session.execute(
            sa.select(JobCheckpoint.sha256).join(TrainingJob, TrainingJob.id == JobCheckpoint.job_id)
            .where(TrainingJob.tenant_id == tenant_id)
        ).scalars()
    )
    session.execute(sa.delete(Tenant).where(Tenant.id == tenant_id))  # ON DELETE CASCADE does the rest
    session.commit()
    log.info("deleted tenant %s (%d prefixes, %d blobs to check)", tenant_id, len(prefix_ids), len(shas))
    delete_unreferenced_blobs(session=session, stores=stores, shas=shas)
    for prefix_id in prefix_ids:
        stores.invalidate(tenant_id, prefix_id)


def create_key(*, session: Session, tenant_id: str, scopes: list[Scope]) -> KeyCreated:
    """A new API key for the tenant with exactly `scopes`."""
    _tenant(session, tenant_id)
    row, raw = _key_row(tenant_id, scopes)
    session.add(row)
    session.commit()
    log.info("created key %s for tenant %s with scopes %s", row.id, tenant_id, row.scopes)
    return KeyCreated(id=row.id, tenant_id=tenant_id, key=raw, scopes=sorted(set(scopes)),
                      created_at=row.created_at)


def list_keys(*, session: Session, tenant_id: str) -> list[KeyInfo]:
    """The tenant's keys (revoked ones included), oldest first; never the keys themselves."""
    _tenant(session, tenant_id)
    rows = session.execute(
        sa.select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at, ApiKey.id)
    ).scalars()
    return [_key_info(r) for r in rows]


def revoke_key(*, session: Session, key_id: str) -> KeyInfo:
    """Mark the key revoked (effective for the next request: authentication skips revoked keys).
    Revoking a revoked key keeps its first revocation time."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key {key_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
        log.info("revoked key %s of tenant %s", key_id, row.tenant_id)
    return _key_info(row)
