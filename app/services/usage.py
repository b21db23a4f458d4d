"""The calling tenant's current use of each of its limits (`GET /v1/usage`), read-only.

Rates and concurrent requests come from the same CounterStore keys the checks in app/services/limits.py count
in (so a rate with no limit, which is never counted, reads as null); counts and bytes from the same queries
the quota checks run.
"""

from __future__ import annotations

from dataclasses import asdict

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.db.models import EndUser, UserExample
from app.protocol.admin import TenantLimitValues
from app.protocol.usage import TenantUsage, UsageValues
from app.services import limits
from app.services.batches import unfinished_batch_count
from app.services.limit_store import CounterStore, RateUse
from app.services.limits import Limits


def counted_use(store: CounterStore, *, tenant_id: str, tenant_limits: Limits
                ) -> tuple[RateUse | None, RateUse | None, int | None]:
    """(requests this minute, tokens this minute, requests in flight). No database here: when the counters
    are in Redis, the caller runs this on a thread before it takes a connection."""
    requests = tokens = None
    if tenant_limits.requests_per_minute is not None:
        requests = store.used(f"requests:{tenant_id}", tenant_limits.requests_per_minute)
    if tenant_limits.tokens_per_minute is not None:
        tokens = store.used(f"tokens:{tenant_id}", tenant_limits.tokens_per_minute)
    in_flight = None
    if tenant_limits.max_concurrent_requests is not None:
        in_flight = store.slots_in_use(f"requests:{tenant_id}")
    return requests, tokens, in_flight


def most_user_examples(session: Session, tenant_id: str) -> int:
    """Examples of the tenant's end user who has the most (max_examples_per_user is per user)."""
    per_user = (sa.select(sa.func.count().label("n")).select_from(UserExample)
                .join(EndUser, EndUser.id == UserExample.end_user_id)
                .where(EndUser.tenant_id == tenant_id).group_by(UserExample.end_user_id).subquery())
    return int(session.scalar(sa.select(sa.func.coalesce(sa.func.max(per_user.c.n), 0))) or 0)


def tenant_usage(*, session: Session, tenant_id: str, tenant_limits: Limits,
                 counted: tuple[RateUse | None, RateUse | None, int | None]) -> TenantUsage:
    """The usage document: `counted` from `counted_use`, the rest queried here."""
    requests, tokens, in_flight = counted
    resets = [u.resets_in_s for u in (requests, tokens) if u is not None]
    usage = UsageValues(
        requests_per_minute=requests.used if requests is not None else None,
        tokens_per_minute=tokens.used if tokens is not None else None,
        max_concurrent_requests=in_flight,
        max_prefixes=limits.prefix_count(session, tenant_id),
        max_stored_bytes=limits.stored_bytes(session, tenant_id),
        max_concurrent_jobs=limits.active_job_count(session, tenant_id),
        max_examples_per_user=most_user_examples(session, tenant_id),
        max_concurrent_batches=unfinished_batch_count(session, tenant_id),
    )
    return TenantUsage(tenant_id=tenant_id, limits=TenantLimitValues(**asdict(tenant_limits)), usage=usage,
                       window_resets_in_s=max(resets) if resets else None)
