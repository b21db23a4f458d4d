"""FastAPI dependencies, declared once as Annotated aliases."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.errors import Forbidden, Unauthorized, Unavailable
from app.observability.context import current as request_record
from app.observability.context import note_tenant
from app.protocol.admin import TenantLimitValues
from app.services import limits
from app.services.auth import Principal, authenticate

if TYPE_CHECKING:
    from app.engine.client import EngineClient
    from app.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated["Runtime", Depends(get_runtime)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    with runtime.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_principal(request: Request, runtime: RuntimeDep, session: SessionDep) -> Principal:
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
    # A database outage here is the global handler's 503 (app/errors.py install_handlers).
    principal = authenticate(session, raw_key=key.strip(), admin_key=runtime.admin_key)
    if principal is None:
        raise Unauthorized("invalid API key")
    note_tenant(principal.tenant_id)  # for the access log
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_limits(principal: PrincipalDep, runtime: RuntimeDep, session: SessionDep) -> TenantLimitValues | None:
    """The calling tenant's effective limits (None for the admin key, which has none)."""
    if principal.tenant_id is None:
        return None
    return limits.effective_limits(session=session, settings=runtime.settings, tenant_id=principal.tenant_id)


LimitsDep = Annotated[TenantLimitValues | None, Depends(get_limits)]


def require_tenant(scope: str) -> Callable[..., Principal]:
    """A dependency: a tenant key holding `scope` (the admin key is not a tenant and is refused here), within
    its requests_per_minute (every tenant request counts)."""

    def dep(principal: PrincipalDep, tenant_limits: LimitsDep, runtime: RuntimeDep) -> Principal:
        if principal.is_admin:
            raise Forbidden("the admin key cannot access tenant data; use a tenant API key")
        if scope not in principal.scopes and not (scope == "inference" and "manage" in principal.scopes):
            raise Forbidden(f"this API key lacks the `{scope}` scope")
        assert principal.tenant_id is not None and tenant_limits is not None
        limits.check_request_rate(store=limits.counters(runtime), tenant_id=principal.tenant_id,
                                  limits=tenant_limits)
        return principal

    return dep


def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this endpoint needs the platform admin key")
    return principal


InferenceDep = Annotated[Principal, Depends(require_tenant("inference"))]
ManageDep = Annotated[Principal, Depends(require_tenant("manage"))]
AdminDep = Annotated[Principal, Depends(require_admin)]


def generation_slot(principal: InferenceDep, tenant_limits: LimitsDep, runtime: RuntimeDep) -> Iterator[None]:
    """A completions/chat request: room left in tokens_per_minute and one of max_concurrent_requests slots,
    held until the response ends (a stream included); then its completion tokens are counted."""
    assert principal.tenant_id is not None and tenant_limits is not None
    store = limits.counters(runtime)
    limits.check_token_rate(store=store, tenant_id=principal.tenant_id, limits=tenant_limits)
    token = limits.acquire_request_slot(store=store, tenant_id=principal.tenant_id, limits=tenant_limits)
    try:
        yield
    finally:
        limits.release_request_slot(store=store, tenant_id=principal.tenant_id, token=token)
        record = request_record()  # the serving core notes each choice's completion tokens there
        if record is not None:
            limits.record_tokens(store=store, tenant_id=principal.tenant_id, limits=tenant_limits,
                                 tokens=record.completion_tokens)


GenerationDep = Annotated[None, Depends(generation_slot)]


def get_engine_client(request: Request) -> EngineClient:
    # Takes the Request, not RuntimeDep: the return type is TYPE_CHECKING-only, and when FastAPI cannot
    # evaluate a signature it leaves string annotations unresolved (a `RuntimeDep` here became a query param).
    runtime = get_runtime(request)
    if runtime.engine_client is None:
        raise Unavailable("the model is not loaded yet", headers={"Retry-After": "5"})
    return runtime.engine_client


EngineClientDep = Annotated["EngineClient", Depends(get_engine_client)]


def get_served_fingerprint(request: Request) -> str:
    """The served base model's fingerprint: a prefix version made for another one is refused up front."""
    loaded = get_runtime(request).model
    if loaded is None:
        raise Unavailable("the model is not loaded yet", headers={"Retry-After": "5"})
    return loaded.spec.fingerprint


ServedFingerprintDep = Annotated[str, Depends(get_served_fingerprint)]
