"""FastAPI dependencies, declared once as Annotated aliases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Annotated, TypeVar

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.engine.protocol import EngineClientProtocol
from app.errors import Forbidden, ServiceError, Unauthorized, Unavailable
from app.observability.context import current as request_record
from app.observability.context import note_tenant
from app.services import limits
from app.services.access import Access, StackQuery, admin_access, authorize
from app.services.auth import Principal
from app.services.limit_store import CounterStore
from app.services.limits import Limits
from app.services.stacks import StackLimits, named_stack

if TYPE_CHECKING:
    from app.runtime import Runtime

T = TypeVar("T")


def runtime_of(request: Request) -> Runtime:
    """The Runtime the composition root built (app/main.py's lifespan)."""
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_runtime(request: Request) -> Runtime:
    # async: a plain `def` dependency is run on FastAPI's thread pool, a hand-off per request for a read.
    return runtime_of(request)


# `limit` of the OpenAI-style list endpoints (cursor pages: `after`, `limit`).
PageLimit = Annotated[int, Query(ge=1, le=100)]

RuntimeDep = Annotated["Runtime", Depends(get_runtime)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    """A session for a route's own queries. Its connection is taken at the first query and given back when the
    route function returns (scope "function"): before a response streams, never held across one."""
    with runtime.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def bearer_key(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
    return key.strip()


async def _authorize(request: Request, runtime: Runtime, model: StackQuery | None = None) -> Access:
    """The caller's access, from one query in a short session on a database thread (see DbCalls). A database
    outage is the global handler's 503 (app/errors.py install_handlers); no free thread or connection, a 503
    `database_busy`."""
    key = bearer_key(request)
    access = admin_access(key, runtime.admin_key)
    if access is None:
        settings, admin_key = runtime.settings, runtime.admin_key
        access = await runtime.db_calls.run(
            lambda session: authorize(session, raw_key=key, admin_key=admin_key, settings=settings, model=model))
    if access is None:
        raise Unauthorized("invalid API key")
    note_tenant(access.principal.tenant_id)  # for the access log
    return access


async def get_access(request: Request) -> Access:
    return await _authorize(request, runtime_of(request))


AccessDep = Annotated[Access, Depends(get_access)]


async def get_principal(access: AccessDep) -> Principal:
    return access.principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_limits(access: AccessDep) -> Limits | None:
    """The calling tenant's effective limits (None for the admin key, which has none)."""
    return access.limits


LimitsDep = Annotated[Limits | None, Depends(get_limits)]


async def _counted(runtime: Runtime, fn: Callable[[CounterStore], T]) -> T:
    """A rate or slot operation: Redis calls (sub-second socket timeouts) on a thread, in-process ones inline."""
    store = runtime.counters
    if store.shared:
        return await run_in_threadpool(fn, store)
    return fn(store)


def _tenant_of(access: Access, scope: str) -> tuple[str, Limits]:
    """The tenant of a key holding `scope` and its limits; the admin key is not a tenant and is refused here."""
    principal, tenant_limits = access.principal, access.limits
    if principal.is_admin:
        raise Forbidden("the admin key cannot access tenant data; use a tenant API key")
    if scope not in principal.scopes and not (scope == "inference" and "manage" in principal.scopes):
        raise Forbidden(f"this API key lacks the `{scope}` scope")
    assert principal.tenant_id is not None and tenant_limits is not None
    return principal.tenant_id, tenant_limits


def require_tenant(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the principal of a tenant key holding `scope`, within its requests_per_minute (every tenant
    request counts)."""

    async def dep(request: Request, access: AccessDep) -> Principal:
        tenant_id, tenant_limits = _tenant_of(access, scope)
        await _counted(runtime_of(request), lambda store: limits.check_request_rate(
            store=store, tenant_id=tenant_id, limits=tenant_limits))
        return access.principal

    return dep


async def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this endpoint needs the platform admin key")
    return principal


InferenceDep = Annotated[Principal, Depends(require_tenant("inference"))]
ManageDep = Annotated[Principal, Depends(require_tenant("manage"))]
AdminDep = Annotated[Principal, Depends(require_admin)]


async def _named_model(request: Request, base_model_id: str | None, limits: StackLimits) -> StackQuery | None:
    """The prefix versions the JSON body's `model` (or `prefixes`) names, a stack's parts included, to look up
    with the key; None for the base model or when the body names nothing usable (the route's own validation and
    the serving core answer that). FastAPI has parsed the body before the dependencies run and Starlette keeps
    it, so this reads no bytes from the client."""
    try:
        body = await request.json()
    except ValueError:
        return None
    model = body.get("model") if isinstance(body, dict) else None
    prefixes = body.get("prefixes") if isinstance(body, dict) else None
    if not isinstance(model, str) or base_model_id is None:
        return None
    if prefixes is not None and not (isinstance(prefixes, list) and all(isinstance(p, str) for p in prefixes)):
        return None
    try:
        return named_stack(model, prefixes, base_model_id=base_model_id, limits=limits).parts or None
    except ServiceError:
        return None


async def generation_access(request: Request) -> AsyncIterator[Access]:
    """A completions/chat request: an inference key, the version its `model` names (same query), room left in
    tokens_per_minute and one of max_concurrent_requests slots, held until the response ends (a stream
    included); then its completion tokens are counted. Holds no thread and no connection meanwhile."""
    runtime = runtime_of(request)
    client = runtime.engine_client
    query = await _named_model(request, client.model_id if client is not None else None,
                               StackLimits.of(runtime.settings))
    access = await _authorize(request, runtime, query)
    tenant_id, tenant_limits = _tenant_of(access, "inference")

    def take(store: CounterStore) -> str | None:  # one hand-off for all three when the counters are in Redis
        limits.check_request_rate(store=store, tenant_id=tenant_id, limits=tenant_limits)
        limits.check_token_rate(store=store, tenant_id=tenant_id, limits=tenant_limits)
        return limits.acquire_request_slot(store=store, tenant_id=tenant_id, limits=tenant_limits)

    token = await _counted(runtime, take)
    try:
        yield access
    finally:
        record = request_record()  # the serving core notes each choice's completion tokens there
        tokens = record.completion_tokens if record is not None else 0

        def give_back(store: CounterStore) -> None:
            limits.release_request_slot(store=store, tenant_id=tenant_id, token=token)
            limits.record_tokens(store=store, tenant_id=tenant_id, limits=tenant_limits, tokens=tokens)

        await _counted(runtime, give_back)


GenerationDep = Annotated[Access, Depends(generation_access)]


async def get_engine_client(request: Request) -> EngineClientProtocol:
    runtime = runtime_of(request)
    if runtime.engine_client is None:
        raise Unavailable("the model is not loaded yet", headers={"Retry-After": "5"})
    return runtime.engine_client


EngineClientDep = Annotated[EngineClientProtocol, Depends(get_engine_client)]


async def get_served_fingerprint(request: Request) -> str:
    """The served base model's fingerprint: a prefix version made for another one is refused up front."""
    loaded = runtime_of(request).model
    if loaded is None:
        raise Unavailable("the model is not loaded yet", headers={"Retry-After": "5"})
    return loaded.spec.fingerprint


ServedFingerprintDep = Annotated[str, Depends(get_served_fingerprint)]
