"""Where per-tenant rate and concurrency counters live: Redis when configured (shared by every replica), else
this process's memory.

Rates use the `limits` library's fixed-window counters. Fixed, not moving, windows: generated tokens are known
only after generation, and a fixed window's counter records a hit even past the limit (a moving window would
drop it), so the tokens of a request that overshot still hold the tenant back until the window ends.

Concurrency is a set of request slots scored by their start time (a Redis sorted set): a slot is released when
its request ends, and one that a crashed replica never released expires after `slot_ttl_s`.

Redis failures fail open: the request goes through and one warning is logged per outage. A rate limit is a
fairness tool, not a security boundary, and serving must go on while Redis is down. After a failure
Redis is skipped for `retry_interval_s`, so an outage costs requests no connect timeout each.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis
from limits import RateLimitItemPerMinute
from limits.errors import StorageError
from limits.storage import MemoryStorage, RedisStorage
from limits.strategies import FixedWindowRateLimiter

log = logging.getLogger(__name__)

KEY_PREFIX = "ps:limits"
T = TypeVar("T")


@dataclass(frozen=True)
class RateCheck:
    """A rate limit's answer: whether there is room, and when (seconds from now) the window starts afresh."""

    allowed: bool
    retry_after_s: int = 0


ALLOWED = RateCheck(True)


@dataclass(frozen=True)
class RateUse:
    """A per-minute counter as it stands: units counted in the current window, seconds until it starts afresh."""

    used: int
    resets_in_s: int


class CounterStore:
    """Per-minute rate counters and concurrency slots, keyed by strings such as `requests:<tenant id>`."""

    def __init__(self, redis_url: str | None, *, slot_ttl_s: float, socket_timeout_s: float = 0.5,
                 retry_interval_s: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        self.slot_ttl_s = slot_ttl_s
        # Slots' start times: wall-clock seconds, comparable between replicas; tests pass a clock they advance.
        self._clock = clock
        self.retry_interval_s = retry_interval_s
        self._redis: redis.Redis | None = None
        if redis_url is None:
            self._limiter = FixedWindowRateLimiter(MemoryStorage())
        else:
            self._limiter = FixedWindowRateLimiter(RedisStorage(
                redis_url, key_prefix=KEY_PREFIX, wrap_exceptions=True, socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s))
            self._redis = redis.Redis.from_url(redis_url, socket_timeout=socket_timeout_s,
                                               socket_connect_timeout=socket_timeout_s)
        self._slots: dict[str, dict[str, float]] = {}  # in-process slots: key -> {token: start time}
        self._lock = threading.Lock()
        self._skip_until = 0.0
        self._failing = False

    @property
    def shared(self) -> bool:
        """True when the counters live in Redis (every replica sees the same counts)."""
        return self._redis is not None

    # ---- rates -------------------------------------------------------------------------------------------------
    def hit(self, key: str, limit: int, *, cost: int = 1) -> RateCheck:
        """Count `cost` against a per-minute limit; refused if the window's count is now over it."""
        item = RateLimitItemPerMinute(limit)
        return self._guard("rate", lambda: self._answer(item, key, self._limiter.hit(item, key, cost=cost)), ALLOWED)

    def test(self, key: str, limit: int) -> RateCheck:
        """Whether the window has room for at least one more unit (nothing is counted)."""
        item = RateLimitItemPerMinute(limit)
        return self._guard("rate", lambda: self._answer(item, key, self._limiter.test(item, key)), ALLOWED)

    def add(self, key: str, limit: int, amount: int) -> None:
        """Record `amount` units in the window even past the limit (tokens already generated)."""
        if amount > 0:
            item = RateLimitItemPerMinute(limit)
            self._guard("rate", lambda: self._limiter.hit(item, key, cost=amount), False)

    def used(self, key: str, limit: int) -> RateUse | None:
        """What the current window has counted against a per-minute limit, without counting anything; None while
        Redis fails. The window's key includes `limit`, as the one `hit` and `add` count in (a changed limit starts
        a fresh window, for the checks too)."""
        item = RateLimitItemPerMinute(limit)

        def read() -> RateUse:
            stats = self._limiter.get_window_stats(item, key)
            return RateUse(used=max(0, limit - stats.remaining),
                           resets_in_s=max(0, math.ceil(stats.reset_time - time.time())))

        return self._guard("rate", read, None)

    def _answer(self, item: RateLimitItemPerMinute, key: str, allowed: bool) -> RateCheck:
        if allowed:
            return ALLOWED
        reset = self._limiter.get_window_stats(item, key).reset_time
        return RateCheck(False, max(1, math.ceil(reset - time.time())))

    # ---- concurrency -------------------------------------------------------------------------------------------
    def acquire(self, key: str, limit: int) -> str | None:
        """Take one of `limit` slots: a token to `release`, or None when all are taken. Fails open (a token)."""
        token = uuid.uuid4().hex
        if self._redis is None:
            return token if self._acquire_local(key, limit, token) else None
        return token if self._guard("slots", lambda: self._acquire_redis(key, limit, token), True) else None

    def release(self, key: str, token: str) -> None:
        if self._redis is None:
            with self._lock:
                self._slots.get(key, {}).pop(token, None)
            return
        client = self._redis
        self._guard("slots", lambda: bool(client.zrem(self._slot_key(key), token)), False)

    def slots_in_use(self, key: str) -> int | None:
        """Slots taken now (expired ones left out); None while Redis fails."""
        cutoff = self._clock() - self.slot_ttl_s
        if self._redis is None:
            with self._lock:
                return sum(1 for started in self._slots.get(key, {}).values() if started >= cutoff)
        client = self._redis
        # redis-py types sync calls as Awaitable | result; this client is the sync one.
        return self._guard("slots", lambda: int(client.zcount(self._slot_key(key), cutoff, "+inf")),  # type: ignore[arg-type]
                           None)

    def _acquire_local(self, key: str, limit: int, token: str) -> bool:
        now = self._clock()
        with self._lock:
            slots = self._slots.setdefault(key, {})
            for t in [t for t, started in slots.items() if started < now - self.slot_ttl_s]:
                del slots[t]
            if len(slots) >= limit:
                return False
            slots[token] = now
            return True

    def _acquire_redis(self, key: str, limit: int, token: str) -> bool:
        assert self._redis is not None
        name, now = self._slot_key(key), self._clock()
        pipe = self._redis.pipeline(transaction=True)
        pipe.zremrangebyscore(name, "-inf", now - self.slot_ttl_s)  # slots of crashed replicas expire
        pipe.zadd(name, {token: now})
        pipe.zcard(name)
        pipe.expire(name, math.ceil(self.slot_ttl_s))
        count = int(pipe.execute()[2])
        if count > limit:
            # Two racing acquirers may both back off here: conservative, never over the limit.
            self._redis.zrem(name, token)
            return False
        return True

    @staticmethod
    def _slot_key(key: str) -> str:
        return f"{KEY_PREFIX}:slots:{key}"

    # ---- failure handling --------------------------------------------------------------------------------------
    def _guard(self, what: str, call: Callable[[], T], fallback: T) -> T:
        """Run a storage call; on a Redis failure (or during the back-off after one) return `fallback`."""
        if self._failing and time.monotonic() < self._skip_until:
            return fallback
        try:
            out = call()
        except (StorageError, redis.RedisError) as exc:
            if not self._failing:
                log.warning("limit counters unavailable (%s: %s); not enforcing rate and concurrency limits",
                            what, type(exc).__name__)
            self._failing = True
            self._skip_until = time.monotonic() + self.retry_interval_s
            return fallback
        if self._failing:
            log.info("limit counters reachable again")
            self._failing = False
        return out

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
