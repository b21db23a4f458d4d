"""The device pool: decoded prefixes already on the model's device, an LRU bounded in bytes (§3.1).

Keyed by the immutable PrefixKey, so an entry is never stale, only possibly unwanted (deleted or replaced),
which `evict_prefix` handles. Entries can be pinned (refcounted) so they are never evicted; the engine does not
pin: a batch copies each prefix into its own cache at prefill, so an entry's tensors are not held by any row.

Bound: `max_bytes` is a target, not a hard limit. When every entry is pinned, a put still succeeds and the
pool exceeds its bound until rows finish and unpin; failing the request instead would turn memory pressure
into errors.
An unpinned prefix larger than the whole pool is returned to the caller but not kept.

Thread-safe: the engine thread and the asyncio thread both use it; one lock guards everything.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

from prefix_store.cache_tier import PrefixKey
from prefix_store.types import PrefixKV

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    kv: PrefixKV
    nbytes: int
    pins: int = 0
    doomed: bool = False  # evicted while pinned: dropped at the last unpin, invisible to get()


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of the pool's counters."""

    max_bytes: int
    bytes: int
    entries: int
    pinned: int
    hits: int
    misses: int
    evictions: int


class DevicePool:
    """LRU of PrefixKV by PrefixKey, bounded in bytes, with refcounted pins."""

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

    def get(self, key: PrefixKey, *, pin: bool = False, record: bool = True) -> PrefixKV | None:
        """The prefix if present (and not invalidated); mark it most recently used; optionally pin it.

        `record=False` leaves hit/miss counters alone (for a caller re-checking after a counted miss).
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.doomed:
                if record:
                    self._misses += 1
                return None
            if record:
                self._hits += 1
            self._entries.move_to_end(key)
            if pin:
                entry.pins += 1
            return entry.kv

    def put(self, key: PrefixKey, kv: PrefixKV, *, pin: bool = False) -> PrefixKV:
        """Insert `kv` (already on the device) and return the pool's copy for `key`.

        If the key is already present, the existing tensors are kept and returned (same key, same content), so
        concurrent loaders converge on one copy; a doomed entry is revived. Then evicts LRU unpinned entries
        down to the bound.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                nbytes = kv.nbytes
                if not pin and nbytes > self.max_bytes:
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
                entry.doomed = False
                self._entries.move_to_end(key)
            if pin:
                entry.pins += 1
            self._shrink()
            return entry.kv

    def pin(self, key: PrefixKey) -> None:
        """Pin a present entry (refcount +1); raise KeyError if it is absent or invalidated."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.doomed:
                raise KeyError(key)
            entry.pins += 1

    def unpin(self, key: PrefixKey) -> None:
        """Drop one pin; at zero the entry becomes evictable (and is dropped now if it was invalidated)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.pins == 0:
                raise KeyError(f"unpin of an entry that is not pinned: {key}")
            entry.pins -= 1
            if entry.pins == 0:
                if entry.doomed:
                    self._remove(key)
                else:
                    self._shrink()  # pins may have held the pool over its bound

    def evict_prefix(self, tenant_id: str, prefix_id: str) -> int:
        """Drop every version of a prefix; pinned ones go at their last unpin. Return the number affected."""
        with self._lock:
            keys = [k for k in self._entries if k.tenant_id == tenant_id and k.prefix_id == prefix_id]
            for key in keys:
                entry = self._entries[key]
                if entry.pins:
                    entry.doomed = True
                else:
                    self._remove(key)
                    self._evictions += 1
            return len(keys)

    def clear(self) -> None:
        """Drop all unpinned entries; doom the pinned ones."""
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.pins:
                    entry.doomed = True
                else:
                    self._remove(key)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                max_bytes=self.max_bytes,
                bytes=self._bytes,
                entries=len(self._entries),
                pinned=sum(1 for e in self._entries.values() if e.pins),
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            entry = self._entries.get(key)  # type: ignore[call-overload]
            return entry is not None and not entry.doomed

    def _shrink(self) -> None:
        """Evict least recently used unpinned entries until within the bound (lock held)."""
        if self._bytes <= self.max_bytes:
            return
        for key in [k for k, e in self._entries.items() if not e.pins]:
            if self._bytes <= self.max_bytes:
                break
            self._remove(key)
            self._evictions += 1
        if self._bytes > self.max_bytes:
            log.debug(
                "device pool over its bound (%d > %d bytes): remaining entries are pinned",
                self._bytes,
                self.max_bytes,
            )

    def _remove(self, key: PrefixKey) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
