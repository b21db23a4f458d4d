"""`GET /v1/usage`: the calling tenant's limits beside its current use of each, read from the counters and
tables the limits are enforced from."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.protocol.admin import TenantLimitValues


class UsageValues(BaseModel):
    """What the tenant uses now, one field per limit. Null: not counted (the limit is unlimited, so its counter
    is never kept) or unknown (the shared counters in Redis do not answer)."""

    requests_per_minute: int | None = Field(
        description="requests counted in the current one-minute window (this one included)")
    tokens_per_minute: int | None = Field(description="generated tokens counted in the current window")
    max_concurrent_requests: int | None = Field(description="completions and chat requests in flight")
    max_prefixes: int = Field(description="the tenant's prefixes (personal ones not counted)")
    max_stored_bytes: int = Field(description="bytes of prefix versions and files together")
    max_concurrent_jobs: int = Field(description="training jobs queued or running")
    max_examples_per_user: int = Field(description="examples of the end user who has the most")
    max_concurrent_batches: int = Field(description="batches not yet finished")


class TenantUsage(BaseModel):
    """The calling tenant's limits (`limits`: those enforced, null = unlimited) and use (`usage`, by the same
    field names); `window_resets_in_s`: seconds until the per-minute counters start afresh (null when unknown)."""

    object: Literal["tenant.usage"] = "tenant.usage"
    tenant_id: str
    limits: TenantLimitValues
    usage: UsageValues
    window_resets_in_s: int | None
