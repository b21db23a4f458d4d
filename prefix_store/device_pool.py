"""The device pool: decoded prefixes already on the model's device, an LRU bounded in bytes
(docs/storage.md).

Keyed by the immutable PrefixKey, so an entry is never stale, only possibly unwanted (deleted or replaced),
which `evict_prefix` handles. Nothing pins entries: a batch copies each prefix into its own cache at prefill, so
evicting an entry never takes tensors away from a running row.

Bound: `max_bytes` holds after every put. A prefix larger than the whole pool is returned to the caller but not
kept.

Thread-safe: the engine thread and the asyncio thread both use it; one lock guards everything.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

from prefix_store.cache_tier import PrefixKey
from prefix_store.types import PrefixTensors

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    kv: PrefixTensors
    nbytes: int


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of the pool's counters."""

    max_bytes: int
    bytes: int
    entries: int
    hits: int
    misses: int
    evictions: int


class DevicePool:
    """LRU of decoded prefixes (KV prefixes and soft prompts) by PrefixKey, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[PrefixKey, _Entry] = OrderedDict()  # oldest first
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def get(self, key: PrefixKey, *, record: bool = True) -> PrefixTensors | None:
        """The prefix if present; mark it most recently used.

        `record=False` leaves hit/miss counters alone (for a caller re-checking after a counted miss).
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                if record:
                    self._misses += 1
                return None
            if record:
                self._hits += 1
            self._entries.move_to_end(key)
            return entry.kv

    def put(self, key: PrefixKey, kv: PrefixTensors) -> PrefixTensors:
        """Insert `kv` (already on the device) and return the pool's copy for `key`.

        If the key is already present, the existing tensors are kept and returned (same key, same content), so
        concurrent loaders converge on one copy. Then evicts LRU entries down to the bound.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                nbytes = kv.nbytes
                if nbytes > self.max_bytes:
                    log.info(
                        "prefix %s (%d bytes) exceeds the device pool (%d bytes): not kept",
                        key.redis_key,
                        nbytes,
                        self.max_bytes,
                    )
                    return kv
                entry = _Entry(kv=kv, nbytes=nbytes)
                self._entries[key] = entry
                self._bytes += nbytes
            else:
                self._entries.move_to_end(key)
            self._shrink()
            return entry.kv

    def evict_prefix(self, tenant_id: str, prefix_id: str) -> int:
        """Drop every version of a prefix. Return the number dropped."""
        with self._lock:
            keys = [k for k in self._entries if k.tenant_id == tenant_id and k.prefix_id == prefix_id]
            for key in keys:
                self._remove(key)
                self._evictions += 1
            return len(keys)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                max_bytes=self.max_bytes,
                bytes=self._bytes,
                entries=len(self._entries),
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def _shrink(self) -> None:
        """Evict least recently used entries until within the bound (lock held)."""
        while self._bytes > self.max_bytes:
            self._remove(next(iter(self._entries)))
            self._evictions += 1

    def _remove(self, key: PrefixKey) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
