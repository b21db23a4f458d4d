"""The calling tenant's limits and current use (any tenant key): what the web console's usage page shows."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api.deps import AccessDep, InferenceDep, RuntimeDep
from app.protocol.usage import TenantUsage
from app.services import usage

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get("")
async def get_usage(principal: InferenceDep, access: AccessDep, runtime: RuntimeDep) -> TenantUsage:
    """Limits enforced (null = unlimited) and use now, by limit: requests and generated tokens in the current
    minute (this request included), requests in flight, prefixes, stored bytes, unfinished jobs and batches,
    and the most examples of one end user. Read-only; counts against requests_per_minute like any request."""
    tenant_id, tenant_limits = principal.tenant_id, access.limits
    assert tenant_id is not None and tenant_limits is not None  # InferenceDep refuses the admin key
    store = runtime.counters
    # Counters first (Redis calls on a thread when shared), then one short session for the counts.
    if store.shared:
        counted = await run_in_threadpool(usage.counted_use, store, tenant_id=tenant_id,
                                          tenant_limits=tenant_limits)
    else:
        counted = usage.counted_use(store, tenant_id=tenant_id, tenant_limits=tenant_limits)

    return await runtime.db_calls.run(lambda session: usage.tenant_usage(
        session=session, tenant_id=tenant_id, tenant_limits=tenant_limits, counted=counted))
