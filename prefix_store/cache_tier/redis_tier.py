"""The Redis cache tier (production): values with a TTL, invalidations over pub/sub."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import redis

from prefix_store.cache_tier.base import INVALIDATION_CHANNEL, InvalidationCallback, PrefixKey, index_key

log = logging.getLogger(__name__)


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
        index = index_key(key.tenant_id, key.prefix_id)
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
        index = index_key(tenant_id, prefix_id)
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
