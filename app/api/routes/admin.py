"""Platform admin endpoints (the admin key only): tenants, their API keys and their limits."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import AdminDep, RuntimeDep, SessionDep
from app.protocol.admin import (
    Deleted,
    KeyCreate,
    KeyCreated,
    KeyInfo,
    KeyList,
    TenantCreate,
    TenantCreated,
    TenantLimits,
    TenantLimitValues,
    TenantList,
)
from app.services import limits, tenants

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/tenants", status_code=201)
def create_tenant(body: TenantCreate, session: SessionDep, _: AdminDep) -> TenantCreated:
    """Create a tenant and its first API key (scopes inference + manage); 409 if the name is taken."""
    return tenants.create_tenant(session=session, name=body.name)


@router.get("/tenants")
def list_tenants(session: SessionDep, _: AdminDep) -> TenantList:
    """Every tenant."""
    return TenantList(data=tenants.list_tenants(session=session))


@router.delete("/tenants/{tenant_id}")
def delete_tenant(tenant_id: str, session: SessionDep, runtime: RuntimeDep, _: AdminDep) -> Deleted:
    """Delete a tenant with everything it owns: rows, unreferenced blobs, cached prefixes."""
    tenants.delete_tenant(session=session, stores=runtime.prefix_stores(), tenant_id=tenant_id)
    return Deleted(id=tenant_id, object="tenant")


@router.post("/tenants/{tenant_id}/keys", status_code=201)
def create_key(tenant_id: str, body: KeyCreate, session: SessionDep, _: AdminDep) -> KeyCreated:
    """A new API key for the tenant with the given scopes."""
    return tenants.create_key(session=session, tenant_id=tenant_id, scopes=body.scopes)


@router.get("/tenants/{tenant_id}/keys")
def list_keys(tenant_id: str, session: SessionDep, _: AdminDep) -> KeyList:
    """The tenant's keys (prefixes of the keys only), revoked ones included."""
    return KeyList(data=tenants.list_keys(session=session, tenant_id=tenant_id))


@router.delete("/keys/{key_id}")
def revoke_key(key_id: str, session: SessionDep, _: AdminDep) -> KeyInfo:
    """Revoke a key; it stops authenticating at once."""
    return tenants.revoke_key(session=session, key_id=key_id)


@router.get("/tenants/{tenant_id}/limits")
def get_limits(tenant_id: str, session: SessionDep, runtime: RuntimeDep, _: AdminDep) -> TenantLimits:
    """The tenant's own limits (null = the server default) and the limits enforced (null = unlimited)."""
    return limits.get_tenant_limits(session=session, settings=runtime.settings, tenant_id=tenant_id)


@router.put("/tenants/{tenant_id}/limits")
def set_limits(tenant_id: str, body: TenantLimitValues, session: SessionDep, runtime: RuntimeDep,
               _: AdminDep) -> TenantLimits:
    """Replace the tenant's limits: a null or absent field returns to the default. Effective at once."""
    return limits.set_tenant_limits(session=session, settings=runtime.settings, tenant_id=tenant_id,
                                    values=body)
