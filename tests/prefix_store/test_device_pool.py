"""DevicePool: LRU by bytes, evict_prefix, thread safety."""

from __future__ import annotations

import hashlib
import random
import threading

import torch

from prefix_store.cache_tier import PrefixKey
from prefix_store.device_pool import DevicePool
from prefix_store.types import PrefixKV

UNIT = 2 * 4 * 16  # bytes of kv(1): keys + values, 16 float32 each


def kv(units: int = 1) -> PrefixKV:
    """A prefix of `units` * UNIT bytes: keys/values [1, 1, 4*units, 4] float32."""
    t = torch.zeros(1, 1, 4 * units, 4)
    return PrefixKV(keys=t, values=t.clone())


def key(prefix_id: str, version: int = 1, tenant_id: str = "t") -> PrefixKey:
    return PrefixKey(
        tenant_id, prefix_id, version, hashlib.sha256(f"{prefix_id}{version}".encode()).hexdigest()
    )


def test_lru_by_bytes() -> None:
    pool = DevicePool(3 * UNIT)
    a, b, c, d = (key(x) for x in "abcd")
    for k in (a, b, c):
        pool.put(k, kv())
    assert pool.get(a) is not None  # a becomes most recently used
    pool.put(d, kv())  # over the bound: evicts b, the least recently used
    assert b not in pool and a in pool and c in pool and d in pool
    pool.put(key("big"), kv(2))  # needs two units: evicts c and a
    assert [k in pool for k in (a, c, d)] == [False, False, True]
    s = pool.stats()
    assert s.bytes == 3 * UNIT and s.entries == 2 and s.evictions == 3
    assert s.hits == 1 and s.misses == 0
    assert pool.get(b) is None
    assert pool.stats().misses == 1


def test_put_existing_key_keeps_first_copy() -> None:
    pool = DevicePool(10 * UNIT)
    first, second = kv(), kv()
    assert pool.put(key("a"), first) is first
    assert pool.put(key("a"), second) is first  # same immutable key, same content: converge on one copy
    assert pool.stats().bytes == UNIT


def test_oversized_prefix_is_not_kept() -> None:
    pool = DevicePool(2 * UNIT)
    pool.put(key("a"), kv())
    big = kv(3)
    assert pool.put(key("big"), big) is big
    assert key("big") not in pool and key("a") in pool


def test_evict_prefix_drops_all_versions() -> None:
    pool = DevicePool(10 * UNIT)
    v1, v2, other_prefix, other_tenant = key("p", 1), key("p", 2), key("q"), key("p", 1, tenant_id="u")
    for k in (v1, v2, other_prefix, other_tenant):
        pool.put(k, kv())
    assert pool.evict_prefix("t", "p") == 2
    assert v1 not in pool and v2 not in pool and pool.get(v1) is None
    assert pool.stats().bytes == 2 * UNIT and pool.stats().entries == 2 and pool.stats().evictions == 2
    assert other_prefix in pool and other_tenant in pool


def test_zero_sized_pool_keeps_nothing() -> None:
    pool = DevicePool(0)
    got = kv()
    assert pool.put(key("a"), got) is got
    assert key("a") not in pool and pool.stats().bytes == 0


def test_thread_safety_smoke() -> None:
    pool = DevicePool(8 * UNIT)
    keys = [key(f"p{i % 6}", version=i // 6) for i in range(24)]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(2000):
                k = rng.choice(keys)
                op = rng.random()
                if op < 0.4:
                    pool.get(k)
                elif op < 0.8:
                    pool.put(k, kv(rng.randint(1, 2)))
                else:
                    pool.evict_prefix("t", k.prefix_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = pool.stats()
    assert s.bytes <= 8 * UNIT
    assert s.bytes == sum(v.nbytes for v in (pool.get(k, record=False) for k in keys) if v is not None)
