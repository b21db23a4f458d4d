"""The cache tier: RedisTier against the real Redis (conftest `redis_url`), and the in-process tier."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from prefix_store.cache_tier import InProcessTier, PrefixKey, RedisTier, open_cache_tier
from tests.s3_server import closed_port


def key(prefix_id: str = "p1", version: int = 1, tenant_id: str = "t1", content: bytes = b"x") -> PrefixKey:
    return PrefixKey(tenant_id, prefix_id, version, hashlib.sha256(content).hexdigest())


@pytest.fixture
def tier(redis_url: str) -> Iterator[RedisTier]:
    # A unique channel per test: invalidations of one test never reach another's subscribers.
    t = RedisTier(redis_url, ttl_s=60, max_value_bytes=1000, channel=f"test-inv-{uuid.uuid4().hex}")
    yield t
    t.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_prefix_key() -> None:
    k = key()
    assert k.redis_key == f"prefixserve:prefix:t1:p1:1:{k.sha256}"
    assert key(version=2).redis_key != k.redis_key  # a new version is a new key
    with pytest.raises(ValueError):
        PrefixKey("t:1", "p", 1, k.sha256)
    with pytest.raises(ValueError):
        PrefixKey("t", "", 1, k.sha256)
    with pytest.raises(ValueError, match="invalid blob hash"):
        PrefixKey("t", "p", 1, "../../x")


def test_redis_put_get_with_ttl(tier: RedisTier, raw: redis.Redis) -> None:
    k = key()
    assert tier.get(k) is None
    assert tier.put(k, b"payload")
    assert tier.get(k) == b"payload"
    assert raw.get(k.redis_key) == b"payload"
    ttl = raw.ttl(k.redis_key)
    assert isinstance(ttl, int) and 0 < ttl <= 60
    assert tier.healthy


def test_redis_size_cap(tier: RedisTier, raw: redis.Redis) -> None:
    k = key()
    assert not tier.put(k, b"x" * 1001)
    assert raw.exists(k.redis_key) == 0
    assert tier.get(k) is None
    assert tier.put(k, b"x" * 1000)  # exactly the cap is fine


def test_redis_invalidate_deletes_all_versions_and_notifies_other_connection(
    tier: RedisTier, redis_url: str, raw: redis.Redis
) -> None:
    other = RedisTier(redis_url, ttl_s=60, max_value_bytes=1000, channel=tier.channel)  # another replica
    received: list[tuple[str, str]] = []
    got = threading.Event()

    def on_invalidate(tenant_id: str, prefix_id: str) -> None:
        received.append((tenant_id, prefix_id))
        got.set()

    try:
        other.subscribe(on_invalidate)
        v1, v2, keep = key(version=1), key(version=2, content=b"y"), key(prefix_id="p2")
        for k in (v1, v2, keep):
            assert tier.put(k, b"data")
        tier.invalidate("t1", "p1")
        assert raw.exists(v1.redis_key, v2.redis_key) == 0
        assert tier.get(keep) == b"data"  # another prefix of the tenant is untouched
        assert got.wait(5), "the subscriber on another connection never received the invalidation"
        assert received == [("t1", "p1")]
    finally:
        other.close()


def test_redis_listener_reconnects_after_connection_loss(
    redis_url: str, raw: redis.Redis, tier: RedisTier
) -> None:
    """The listener's connection is killed server-side; it must resubscribe and keep delivering."""
    name = f"listener-{uuid.uuid4().hex[:8]}"
    listener = RedisTier(redis_url, ttl_s=60, max_value_bytes=1000, channel=tier.channel, client_name=name)
    received: list[tuple[str, str]] = []
    try:
        listener.subscribe(lambda t, p: received.append((t, p)))

        def pubsub_client_ids() -> list[str]:
            clients = raw.client_list(_type="pubsub")
            assert isinstance(clients, list)
            return [c["id"] for c in clients if c.get("name") == name]

        assert wait_for(lambda: len(pubsub_client_ids()) == 1)
        old = pubsub_client_ids()
        for client_id in old:
            raw.client_kill_filter(_id=str(client_id))
        assert wait_for(lambda: bool(pubsub_client_ids()) and pubsub_client_ids() != old, timeout=15)

        # Pub/sub is fire-and-forget: a message published while the listener is between reconnect steps is lost
        # (by design: invalidations only free memory). Publish until one arrives, bounded in time.
        def delivered() -> bool:
            tier.invalidate("t1", "after-reconnect")
            return wait_for(lambda: ("t1", "after-reconnect") in received, timeout=0.5)

        assert wait_for(delivered, timeout=15)
    finally:
        listener.close()


def test_redis_down_never_raises(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """With Redis unreachable every call returns at once: a miss, False, nothing. Checked by what the calls do,
    not by how long they take: after the first failure, commands skip Redis (no connect attempt, so a Redis
    that drops packets costs no timeout per request), and `subscribe` returns because its listener's first
    attempt failed, not because its bounded wait ran out."""
    now = [0.0]  # the breaker's clock stands still: the retry interval never passes in this test
    down = RedisTier(f"redis://127.0.0.1:{closed_port()}/0", ttl_s=60, max_value_bytes=1000, clock=lambda: now[0])
    gets: list[str] = []
    redis_get = down._client.get

    def counted_get(name: str) -> object:
        gets.append(name)
        return redis_get(name)

    monkeypatch.setattr(down._client, "get", counted_get)
    subscribe_waits: list[bool] = []
    first_attempt = down._first_attempt
    wait = first_attempt.wait

    def recorded_wait(timeout: float | None = None) -> bool:
        woken = wait(timeout)  # False: the wait ran out
        subscribe_waits.append(woken)
        return woken

    monkeypatch.setattr(first_attempt, "wait", recorded_wait)
    try:
        k = key()
        assert down.get(k) is None
        assert not down.healthy
        assert not down.put(k, b"data")
        down.invalidate("t1", "p1")
        down.subscribe(lambda t, p: None)  # returns although Redis is unreachable; retries in the background
        assert subscribe_waits == [True]
        assert down.get(k) is None
        assert len(gets) == 1  # only the first get reached for Redis; the second was skipped
        assert any("Redis cache tier unavailable" in r.getMessage() for r in caplog.records)
    finally:
        down.close()


def test_redis_recovers_after_retry_interval(redis_url: str) -> None:
    """The circuit breaker skips Redis for retry_interval_s after an error, then probes it again. The interval
    passes on the tier's clock, which the test moves: a stalled test cannot let it pass too early."""
    now = [100.0]
    t = RedisTier(redis_url, ttl_s=60, max_value_bytes=1000, retry_interval_s=30, clock=lambda: now[0])
    try:
        k = key()
        t._failed("test", RuntimeError("simulated"))  # as if the last command had failed
        assert not t.healthy
        assert not t.put(k, b"v")  # skipped while the breaker is open
        now[0] += 29.9
        assert not t.put(k, b"v")  # still skipped just before the interval ends
        assert t.get(k) is None and not t.healthy  # nothing was stored, and Redis was not asked
        now[0] += 0.1
        assert t.put(k, b"v")
        assert t.healthy
        assert t.get(k) == b"v"
    finally:
        t.close()


def test_in_process_tier_ttl_cap_lru_invalidate() -> None:
    now = [0.0]
    t = InProcessTier(ttl_s=10, max_value_bytes=100, max_total_bytes=250, clock=lambda: now[0])
    calls: list[tuple[str, str]] = []
    t.subscribe(lambda a, b: calls.append((a, b)))
    a, b, c, d = (key(prefix_id=f"p{i}") for i in range(4))
    assert t.put(a, b"a" * 100) and t.put(b, b"b" * 100)
    assert not t.put(c, b"c" * 101)  # over the per-value cap
    assert t.get(a) == b"a" * 100  # a is now most recently used
    assert t.put(d, b"d" * 100)  # 300 > 250: evicts the LRU entry, b
    assert t.get(b) is None and t.get(a) is not None and t.nbytes == 200
    now[0] = 10.0
    assert t.get(a) is None  # expired
    assert t.put(key(version=2), b"v2")
    t.invalidate("t1", "p1")
    assert t.get(key(version=2)) is None
    assert calls == [("t1", "p1")]
    assert t.healthy


def test_open_cache_tier(redis_url: str) -> None:
    assert isinstance(open_cache_tier(None, ttl_s=1, max_value_bytes=1), InProcessTier)
    r = open_cache_tier(redis_url, ttl_s=1, max_value_bytes=1)
    assert isinstance(r, RedisTier)
    r.close()
