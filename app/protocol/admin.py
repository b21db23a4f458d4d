"""Request and response models of the platform admin API (`/admin/...`): tenants and their API keys."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Scope = Literal["inference", "manage"]


class TenantCreate(BaseModel):
    """`POST /admin/tenants` body. Unknown fields are refused (a 400 naming the field), as on every request body."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)


class TenantCreated(BaseModel):
    """A new tenant and its first API key (scopes inference + manage). The key is shown only here."""

    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    api_key: str
    api_key_id: str
    created_at: datetime


class TenantInfo(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    created_at: datetime


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantInfo]


class KeyCreate(BaseModel):
    """`POST /admin/tenants/{id}/keys` body."""

    model_config = ConfigDict(extra="forbid")

    scopes: list[Scope] = Field(min_length=1)


class KeyCreated(BaseModel):
    """A new API key; `key` is shown only here (the database keeps its hash)."""

    id: str
    object: Literal["api_key"] = "api_key"
    tenant_id: str
    key: str
    scopes: list[Scope]
    created_at: datetime


class KeyInfo(BaseModel):
    """An API key as listed or revoked: never the key itself, only its first characters."""

    id: str
    object: Literal["api_key"] = "api_key"
    tenant_id: str
    key_prefix: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyInfo]


class Deleted(BaseModel):
    """OpenAI-style delete acknowledgement."""

    id: str
    object: str
    deleted: bool = True


INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


class TenantLimitValues(BaseModel):
    """Per-tenant limits. In a `PUT` body and in `configured`, null means "the server's default"; in
    `effective`, null means unlimited. 0 allows nothing (e.g. suspends a tenant's requests)."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(default=None, ge=0, le=INT32_MAX)
    tokens_per_minute: int | None = Field(default=None, ge=0, le=INT64_MAX,
                                          description="generated (completion) tokens per minute")
    max_concurrent_requests: int | None = Field(default=None, ge=0, le=INT32_MAX,
                                                description="completions and chat requests in flight")
    max_prefixes: int | None = Field(default=None, ge=0, le=INT32_MAX)
    max_stored_bytes: int | None = Field(default=None, ge=0, le=INT64_MAX,
                                         description="prefix versions and files together")
    max_concurrent_jobs: int | None = Field(default=None, ge=0, le=INT32_MAX,
                                            description="training jobs queued or running")
    max_examples_per_user: int | None = Field(default=None, ge=0, le=INT32_MAX)
    max_concurrent_batches: int | None = Field(default=None, ge=0, le=INT32_MAX,
                                               description="batches (`/v1/batches`) not yet finished")


class TenantLimits(BaseModel):
    """`GET/PUT /admin/tenants/{id}/limits`: the tenant's own values and the limits enforced."""

    object: Literal["tenant.limits"] = "tenant.limits"
    tenant_id: str
    configured: TenantLimitValues
    effective: TenantLimitValues
