"""The shared cache tier of serialized prefixes: Redis in production, an in-process dict embedded
(docs/storage.md).

Keys are immutable: (tenant, prefix id, version, content hash). A new version or new content is a new key,
so a cached value is never stale, only unused; TTLs reclaim it. Deletes and replacements also publish an
invalidation so every replica frees the prefix from its device pool. Correctness never depends on that
message arriving: the resolver always asks the catalog which key is current.

A cache is an optimization: every Redis error is caught and logged, `get` answers None, `put` is skipped.

One module per part: base.py (the key, the protocol), redis_tier.py, memory.py; import from here.
"""

from __future__ import annotations

from prefix_store.cache_tier.base import (
    INVALIDATION_CHANNEL,
    KEY_PREFIX,
    CacheTier,
    InvalidationCallback,
    PrefixKey,
)
from prefix_store.cache_tier.memory import InProcessTier
from prefix_store.cache_tier.redis_tier import RedisTier

__all__ = [
    "INVALIDATION_CHANNEL",
    "KEY_PREFIX",
    "CacheTier",
    "InProcessTier",
    "InvalidationCallback",
    "PrefixKey",
    "RedisTier",
    "open_cache_tier",
]


def open_cache_tier(redis_url: str | None, *, ttl_s: int, max_value_bytes: int) -> CacheTier:
    """RedisTier when a URL is configured, else the in-process tier (the embedded default)."""
    if redis_url:
        return RedisTier(redis_url, ttl_s, max_value_bytes)
    return InProcessTier(ttl_s, max_value_bytes)
