"""The in-process cache tier (the embedded default): an LRU dict with a TTL, bounded in bytes."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from prefix_store.cache_tier.base import InvalidationCallback, PrefixKey

log = logging.getLogger(__name__)

class InProcessTier:
    """The embedded stand-in for Redis: a dict with TTL, a per-value cap and an LRU total-bytes cap.

    Invalidation callbacks run synchronously in the invalidating thread: there is only one replica.
    """

    def __init__(
        self,
        ttl_s: float,
        max_value_bytes: int,
        max_total_bytes: int = 256 * 2**20,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_value_bytes = max_value_bytes
        self.max_total_bytes = max_total_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[PrefixKey, tuple[float, bytes]] = OrderedDict()  # LRU order, oldest first
        self._bytes = 0
        self._callbacks: list[InvalidationCallback] = []

    @property
    def healthy(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: PrefixKey) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: PrefixKey, data: bytes) -> bool:
        if len(data) > self.max_value_bytes or len(data) > self.max_total_bytes:
            log.info("not caching %s in process: %d bytes over the cap", key.redis_key, len(data))
            return False
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (self._clock() + self.ttl_s, data)
            self._bytes += len(data)
            while self._bytes > self.max_total_bytes:
                self._drop(next(iter(self._entries)))
        return True

    def _drop(self, key: PrefixKey) -> None:
        _, data = self._entries.pop(key)
        self._bytes -= len(data)

    def invalidate(self, tenant_id: str, prefix_id: str) -> None:
        with self._lock:
            for key in [k for k in self._entries if (k.tenant_id, k.prefix_id) == (tenant_id, prefix_id)]:
                self._drop(key)
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(tenant_id, prefix_id)
            except Exception:
                log.exception("invalidation callback failed for %s/%s", tenant_id, prefix_id)

    def subscribe(self, callback: InvalidationCallback) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
