"""The shared cache tier of serialized prefixes: Redis in production, an in-process dict embedded
(docs/storage.md).

Keys are immutable: (tenant, prefix id, version, content hash). A new version or new content is a new key,
so a cached value is never stale, only unused; TTLs reclaim it. Deletes and replacements also publish an
invalidation so every replica frees the prefix from its device pool. Correctness never depends on that
message arriving: the resolver always asks the catalog which key is current.

A cache is an optimization: every Redis error is caught and logged, `get` answers None, `put` is skipped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis

from prefix_store.blobs import validate_sha256

log = logging.getLogger(__name__)

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


def _index_key(tenant_id: str, prefix_id: str) -> str:
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


class RedisTier:
    """Serialized prefixes in Redis with a TTL; invalidations over pub/sub.

    After a failure, commands are skipped for `retry_interval_s` (a tiny circuit breaker), so a Redis outage
    costs requests no connect timeout each; the next call after the interval probes Redis again.
    """

    def __init__(
        self,
        url: str,
        ttl_s: int,
        max_value_bytes: int,
        *,
        channel: str = INVALIDATION_CHANNEL,
        socket_timeout_s: float = 1.0,
        retry_interval_s: float = 1.0,
        client_name: str = "prefixserve",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_value_bytes = max_value_bytes
        self.channel = channel
        self.retry_interval_s = retry_interval_s
        self._clock = clock  # times the retry interval; tests pass one they advance
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            client_name=client_name,  # visible in CLIENT LIST: operators can tell our connections apart
        )
        self._healthy = True
        self._skip_until = 0.0
        self._lock = threading.Lock()
        self._callbacks: list[InvalidationCallback] = []
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()
        # Set once the listener's SUBSCRIBE is confirmed by Redis, or its first attempt failed.
        self._first_attempt = threading.Event()

    @property
    def healthy(self) -> bool:
        """False since the last failed Redis command, until one succeeds again."""
        return self._healthy

    def _available(self) -> bool:
        return self._healthy or self._clock() >= self._skip_until

    def _ok(self) -> None:
        if not self._healthy:
            log.info("Redis cache tier is reachable again")
        self._healthy = True

    def _failed(self, what: str, exc: Exception) -> None:
        if self._healthy:
            log.warning("Redis cache tier unavailable (%s): %s; serving without it", what, exc)
        else:
            log.debug("Redis still unavailable (%s): %s", what, exc)
        self._healthy = False
        self._skip_until = self._clock() + self.retry_interval_s

    def get(self, key: PrefixKey) -> bytes | None:
        """The cached bytes, or None on a miss or any Redis error."""
        if not self._available():
            return None
        try:
            value = self._client.get(key.redis_key)
        except redis.RedisError as exc:
            self._failed("get", exc)
            return None
        self._ok()
        return value if isinstance(value, bytes) else None

    def put(self, key: PrefixKey, data: bytes) -> bool:
        """Cache `data` with the TTL; return whether it was stored (False: too big, or Redis error)."""
        if len(data) > self.max_value_bytes:
            log.info(
                "not caching %s in Redis: %d bytes > cap %d", key.redis_key, len(data), self.max_value_bytes
            )
            return False
        if not self._available():
            return False
        index = _index_key(key.tenant_id, key.prefix_id)
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.set(key.redis_key, data, ex=self.ttl_s)
            pipe.sadd(index, key.redis_key)
            pipe.expire(index, self.ttl_s)  # the index lives as long as its newest member
            pipe.execute()
        except redis.RedisError as exc:
            self._failed("put", exc)
            return False
        self._ok()
        return True

    def invalidate(self, tenant_id: str, prefix_id: str) -> None:
        """Delete every cached version of the prefix and tell every replica (best effort, never raises)."""
        index = _index_key(tenant_id, prefix_id)
        try:
            members: set[bytes] = self._client.smembers(index)  # type: ignore[assignment]
            pipe = self._client.pipeline(transaction=True)
            if members:
                pipe.delete(*members)
            pipe.delete(index)
            pipe.publish(self.channel, json.dumps({"tenant_id": tenant_id, "prefix_id": prefix_id}))
            pipe.execute()
        except redis.RedisError as exc:
            # Stale keys are harmless (the catalog no longer points at them) and expire with their TTL.
            self._failed("invalidate", exc)
            return
        self._ok()

    def subscribe(self, callback: InvalidationCallback) -> None:
        """Call `callback(tenant_id, prefix_id)` for every invalidation, from a background thread.

        The thread reconnects while Redis is down. Messages published during an outage are lost; that only
        delays freeing memory, since the catalog decides what is served.
        """
        with self._lock:
            self._callbacks.append(callback)
            if self._listener is None:
                self._listener = threading.Thread(
                    target=self._listen, name="prefix-invalidations", daemon=True
                )
                self._listener.start()
        # Wait (bounded) for the SUBSCRIBE confirmation, so an invalidation published right after this call
        # returns is not missed; with Redis down, carry on at once: the listener keeps retrying.
        self._first_attempt.wait(timeout=5.0)

    def _listen(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message is None:
                        continue
                    if message.get("type") == "subscribe":
                        backoff = 0.1
                        self._first_attempt.set()
                    elif message.get("type") == "message":
                        self._dispatch(message.get("data"))
            except Exception as exc:  # Redis errors, but also anything unexpected: the listener must live on
                self._first_attempt.set()
                level = logging.DEBUG if isinstance(exc, redis.RedisError) else logging.WARNING
                log.log(level, "invalidation listener failed: %r; retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                pubsub.close()

    def _dispatch(self, data: object) -> None:
        try:
            payload = json.loads(data)  # type: ignore[arg-type]
            tenant_id, prefix_id = str(payload["tenant_id"]), str(payload["prefix_id"])
        except (TypeError, ValueError, KeyError) as exc:
            log.warning("ignoring malformed invalidation message %r: %s", data, exc)
            return
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(tenant_id, prefix_id)
            except Exception:  # a bad callback must not kill the listener
                log.exception("invalidation callback failed for %s/%s", tenant_id, prefix_id)

    def close(self) -> None:
        """Stop the listener thread and close connections."""
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
        self._client.close()


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


def open_cache_tier(redis_url: str | None, *, ttl_s: int, max_value_bytes: int) -> CacheTier:
    """RedisTier when a URL is configured, else the in-process tier (the embedded default)."""
    if redis_url:
        return RedisTier(redis_url, ttl_s, max_value_bytes)
    return InProcessTier(ttl_s, max_value_bytes)
