"""Response models of the prefix management API (`/v1/prefixes`). Uploads are multipart, not JSON."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from app.protocol.models import KIND_DESCRIPTION, PrefixKind


class PrefixUploaded(BaseModel):
    """`POST /v1/prefixes` answer: the version just stored. `warnings` is empty unless something the client
    should know was accepted anyway (a PEFT adapter recording another base model name)."""

    id: str
    object: Literal["prefix.version"] = "prefix.version"
    name: str
    version: int
    num_virtual_tokens: int
    base_model: str
    sha256: str
    size_bytes: int
    source_format: str
    kind: PrefixKind = Field(default="prefix_tuning", description=KIND_DESCRIPTION)
    created_at: datetime
    warnings: list[str] = Field(default_factory=list)


class PrefixVersionInfo(BaseModel):
    """One immutable version of a prefix."""

    version: int
    sha256: str
    size_bytes: int
    num_virtual_tokens: int
    source_format: str
    kind: PrefixKind = Field(default="prefix_tuning", description=KIND_DESCRIPTION)
    base_model_fingerprint: str
    recorded_base_model: str | None
    created_at: datetime


class PrefixInfo(BaseModel):
    """A prefix with its newest version's facts; `versions` is filled by `GET /v1/prefixes/{name}` only."""

    id: str
    object: Literal["prefix"] = "prefix"
    name: str
    created_at: datetime
    latest_version: int
    num_virtual_tokens: int
    kind: PrefixKind = Field(default="prefix_tuning", description=KIND_DESCRIPTION)
    sha256: str
    versions: list[PrefixVersionInfo] | None = None


class PrefixList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PrefixInfo]


class PrefixDeleted(BaseModel):
    """`DELETE /v1/prefixes/{name}[@version]` answer; `version` is None when every version was deleted."""

    id: str
    object: Literal["prefix"] = "prefix"
    name: str
    version: int | None
    deleted: bool = True
