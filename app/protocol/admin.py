"""Request and response models of the platform admin API (`/admin/...`): tenants and their API keys."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

Scope = Literal["inference", "manage"]


class TenantCreate(BaseModel):
    """`POST /admin/tenants` body."""

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
