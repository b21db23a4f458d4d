"""Per-tenant limits: what they are (the `tenant_limits` row over the Settings defaults) and their checks.

Rates (requests and generated tokens per minute) and concurrent requests are counted in a `CounterStore`
(Redis, or this process's memory); counts and bytes (prefixes, stored bytes, jobs, examples) are queried from
the database when something is created. Two creations racing past a count limit may both succeed: these are
quotas against runaway use, not exact accounting. Every refusal is a 429 with `Retry-After` whose message names
the limit, e.g. "requests_per_minute limit of 60 reached".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import File, Prefix, PrefixVersion, Tenant, TenantLimits, TrainingJob, UserExample
from app.errors import NotFound, RateLimited
from app.protocol.admin import TenantLimits as TenantLimitsOut
from app.protocol.admin import TenantLimitValues
from app.services.limit_store import CounterStore


@dataclass(frozen=True)
class Limits:
    """The limits enforced for one tenant; None = unlimited, 0 allows nothing. The admin API's wire form is
    app/protocol/admin.py's TenantLimitValues (where null in `configured` means "the default")."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # generated (completion) tokens
    max_concurrent_requests: int | None = None  # completions and chat requests in flight
    max_prefixes: int | None = None
    max_stored_bytes: int | None = None  # prefix versions and files together
    max_concurrent_jobs: int | None = None  # training jobs queued or running
    max_examples_per_user: int | None = None
    max_concurrent_batches: int | None = None  # batches (`/v1/batches`) not yet finished


LIMIT_FIELDS = tuple(f.name for f in fields(Limits))
ACTIVE_JOB_STATUSES = ("validating_files", "queued", "running")
QUOTA_RETRY_AFTER_S = 60  # counts and bytes free up only when the tenant deletes something
SLOT_RETRY_AFTER_S = 1
# A concurrency slot outlives its request's timeout by this much before it counts as leaked.
SLOT_TTL_MARGIN_S = 60.0

# ---- what the limits are -------------------------------------------------------------------------------------
def defaults(settings: Settings) -> Limits:
    """The Settings defaults (`PREFIXSERVE_TENANT_*`); None = unlimited."""
    return Limits(**{f: getattr(settings, f"tenant_{f}") for f in LIMIT_FIELDS})


def configured(session: Session, tenant_id: str) -> TenantLimitValues:
    """The tenant's own values (None = the default)."""
    row = session.get(TenantLimits, tenant_id)
    return TenantLimitValues(**{f: getattr(row, f) if row is not None else None for f in LIMIT_FIELDS})


def over_defaults(own: Mapping[str, int | None], settings: Settings) -> Limits:
    """The limits enforced: the tenant's own values (`own`, by field; None = not set), the defaults elsewhere."""
    base = defaults(settings)
    return Limits(**{f: own[f] if own.get(f) is not None else getattr(base, f) for f in LIMIT_FIELDS})


def effective_limits(*, session: Session, settings: Settings, tenant_id: str) -> Limits:
    """The limits enforced for the tenant: its own values, the defaults where it has none."""
    return over_defaults(configured(session, tenant_id).model_dump(), settings)


def get_tenant_limits(*, session: Session, settings: Settings, tenant_id: str) -> TenantLimitsOut:
    if session.get(Tenant, tenant_id) is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    effective = effective_limits(session=session, settings=settings, tenant_id=tenant_id)
    return TenantLimitsOut(tenant_id=tenant_id, configured=configured(session, tenant_id),
                           effective=TenantLimitValues(**asdict(effective)))


def set_tenant_limits(*, session: Session, settings: Settings, tenant_id: str,
                      values: TenantLimitValues) -> TenantLimitsOut:
    """Replace the tenant's values (a null field returns to the default). Effective at the next request."""
    if session.get(Tenant, tenant_id) is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    row = session.get(TenantLimits, tenant_id) or TenantLimits(tenant_id=tenant_id)
    for f in LIMIT_FIELDS:
        setattr(row, f, getattr(values, f))
    session.add(row)
    session.commit()
    return get_tenant_limits(session=session, settings=settings, tenant_id=tenant_id)


# ---- rates and concurrency -----------------------------------------------------------------------------------
def limit_reached(name: str, value: int, retry_after_s: int, *, code: str = "rate_limit_exceeded") -> RateLimited:
    return RateLimited(f"{name} limit of {value} reached; retry after {retry_after_s} s", code=code,
                       headers={"Retry-After": str(retry_after_s)})


def check_request_rate(*, store: CounterStore, tenant_id: str, limits: Limits) -> None:
    """Count this request against requests_per_minute."""
    if limits.requests_per_minute is None:
        return
    answer = store.hit(f"requests:{tenant_id}", limits.requests_per_minute)
    if not answer.allowed:
        raise limit_reached("requests_per_minute", limits.requests_per_minute, answer.retry_after_s)


def check_token_rate(*, store: CounterStore, tenant_id: str, limits: Limits) -> None:
    """Refuse a generation while the minute's generated tokens are already at tokens_per_minute."""
    if limits.tokens_per_minute is None:
        return
    answer = store.test(f"tokens:{tenant_id}", limits.tokens_per_minute)
    if not answer.allowed:
        raise limit_reached("tokens_per_minute", limits.tokens_per_minute, answer.retry_after_s)


def record_tokens(*, store: CounterStore, tenant_id: str, limits: Limits, tokens: int) -> None:
    """Count a finished request's completion tokens (even past the limit: they were generated)."""
    if limits.tokens_per_minute is not None:
        store.add(f"tokens:{tenant_id}", limits.tokens_per_minute, tokens)


def acquire_request_slot(*, store: CounterStore, tenant_id: str, limits: Limits) -> str | None:
    """A concurrency slot for one generation (release it with `release_request_slot`); None = unlimited."""
    if limits.max_concurrent_requests is None:
        return None
    token = store.acquire(f"requests:{tenant_id}", limits.max_concurrent_requests)
    if token is None:
        raise limit_reached("max_concurrent_requests", limits.max_concurrent_requests, SLOT_RETRY_AFTER_S)
    return token


def release_request_slot(*, store: CounterStore, tenant_id: str, token: str | None) -> None:
    if token is not None:
        store.release(f"requests:{tenant_id}", token)


# ---- counts and bytes, checked when something is created -----------------------------------------------------
def quota_reached(name: str, value: int) -> RateLimited:
    return limit_reached(name, value, QUOTA_RETRY_AFTER_S, code="quota_exceeded")


def stored_bytes(session: Session, tenant_id: str) -> int:
    """Bytes the tenant stores: every prefix version (personal ones included) and every file."""
    prefix_bytes = session.scalar(
        sa.select(sa.func.coalesce(sa.func.sum(PrefixVersion.size_bytes), 0))
        .join(Prefix, Prefix.id == PrefixVersion.prefix_id).where(Prefix.tenant_id == tenant_id))
    file_bytes = session.scalar(
        sa.select(sa.func.coalesce(sa.func.sum(File.bytes), 0)).where(File.tenant_id == tenant_id))
    return int(prefix_bytes or 0) + int(file_bytes or 0)


def check_storage(*, session: Session, limits: Limits, tenant_id: str, new_bytes: int) -> None:
    """Refuse storing `new_bytes` more when it would take the tenant past max_stored_bytes."""
    cap = limits.max_stored_bytes
    if cap is not None and stored_bytes(session, tenant_id) + new_bytes > cap:
        raise quota_reached("max_stored_bytes", cap)


def prefix_count(session: Session, tenant_id: str) -> int:
    """Prefixes counted against max_prefixes: the tenant's own, not end users' personal ones."""
    return int(session.scalar(sa.select(sa.func.count()).select_from(Prefix).where(
        Prefix.tenant_id == tenant_id, Prefix.end_user_id.is_(None))) or 0)


def active_job_count(session: Session, tenant_id: str) -> int:
    """Training jobs counted against max_concurrent_jobs: queued or running (or validating)."""
    return int(session.scalar(sa.select(sa.func.count()).select_from(TrainingJob).where(
        TrainingJob.tenant_id == tenant_id, TrainingJob.status.in_(ACTIVE_JOB_STATUSES))) or 0)


def check_new_prefix(*, session: Session, limits: Limits, tenant_id: str, name: str,
                     new_bytes: int) -> None:
    """Before storing a prefix version: max_prefixes (when `name` is new) and max_stored_bytes.
    Personal prefixes (`user:<id>`) do not count against max_prefixes: they scale with end users."""
    cap = limits.max_prefixes
    if cap is not None:
        exists = session.scalar(sa.select(Prefix.id).where(Prefix.tenant_id == tenant_id, Prefix.name == name))
        if exists is None and prefix_count(session, tenant_id) >= cap:
            raise quota_reached("max_prefixes", cap)
    check_storage(session=session, limits=limits, tenant_id=tenant_id, new_bytes=new_bytes)


def check_new_job(*, session: Session, limits: Limits, tenant_id: str) -> None:
    """Before creating a training job: max_concurrent_jobs counts the tenant's jobs not yet finished."""
    cap = limits.max_concurrent_jobs
    if cap is None:
        return
    if active_job_count(session, tenant_id) >= cap:
        raise quota_reached("max_concurrent_jobs", cap)


def check_new_examples(*, session: Session, limits: Limits, end_user_id: str | None,
                       adding: int) -> None:
    """Before adding `adding` examples to an end user (None: a user not created yet, who has none)."""
    cap = limits.max_examples_per_user
    if cap is None:
        return
    have = 0 if end_user_id is None else int(session.scalar(
        sa.select(sa.func.count()).select_from(UserExample).where(UserExample.end_user_id == end_user_id)) or 0)
    if have + adding > cap:
        raise quota_reached("max_examples_per_user", cap)
