"""What both cache tiers share: the immutable key of a cached prefix, the invalidation channel, the protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prefix_store.blobs import validate_sha256

KEY_PREFIX = "prefixserve:prefix"
INVALIDATION_CHANNEL = "prefixserve:invalidate"

InvalidationCallback = Callable[[str, str], None]
"""Called with (tenant_id, prefix_id) when that prefix was changed or deleted somewhere."""


@dataclass(frozen=True)
class PrefixKey:
    """The immutable identity of one prefix version's bytes."""

    tenant_id: str
    prefix_id: str
    version: int
    sha256: str

    def __post_init__(self) -> None:
        # ':' separates key fields; refusing it keeps keys unambiguous and the per-prefix index exact.
        for name in ("tenant_id", "prefix_id"):
            value = getattr(self, name)
            if not value or ":" in value:
                raise ValueError(f"PrefixKey.{name} must be non-empty and contain no ':', got {value!r}")
        validate_sha256(self.sha256)

    @property
    def redis_key(self) -> str:
        return f"{KEY_PREFIX}:{self.tenant_id}:{self.prefix_id}:{self.version}:{self.sha256}"


def index_key(tenant_id: str, prefix_id: str) -> str:
    """A Redis set of every cached key of one prefix, so invalidation needs no keyspace SCAN."""
    return f"{KEY_PREFIX}-index:{tenant_id}:{prefix_id}"


class CacheTier(Protocol):
    """What the resolver needs from a cache tier. Implementations never raise on backend failure."""

    @property
    def healthy(self) -> bool: ...

    def get(self, key: PrefixKey) -> bytes | None: ...

    def put(self, key: PrefixKey, data: bytes) -> bool: ...

    def invalidate(self, tenant_id: str, prefix_id: str) -> None: ...

    def subscribe(self, callback: InvalidationCallback) -> None: ...

    def close(self) -> None: ...
