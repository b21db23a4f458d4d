"""PrefixResolver over real tiers: a file or S3 blob store, the real Redis, the device pool.

The catalog is a dict (the database is another module's job), and the codec is a trivial safetensors stand-in
so these tests do not depend on prefix_store.codec. Blob-store wrappers only count calls or switch a real
store "down"; they never fake a backend.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

from prefix_store.blobs import BlobStore, BlobStoreUnavailable, FileBlobStore, S3BlobStore
from prefix_store.cache_tier import CacheTier, InProcessTier, PrefixKey, RedisTier
from prefix_store.device_pool import DevicePool
from prefix_store.ref import PrefixRef
from prefix_store.resolver import PrefixNotFound, PrefixResolver, PrefixUnavailable
from prefix_store.types import PrefixKV
from tests.s3_server import S3Server, closed_port

TENANT = "t1"


def encode(kv: PrefixKV) -> bytes:
    return safetensors.torch.save({"keys": kv.keys.contiguous(), "values": kv.values.contiguous()})


class CountingDecode:
    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> PrefixKV:
        with self._lock:
            self.calls += 1
        t = safetensors.torch.load(data)
        return PrefixKV(keys=t["keys"], values=t["values"])


class CountingBlobs:
    """Wraps a real BlobStore: counts gets and how many are in progress at once, can hold them at a gate (an
    object store that has not answered yet, up or down), and can be switched 'down'."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.down = False
        self.gets = 0
        self.in_progress = 0
        self.max_in_progress = 0
        self.gate: threading.Event | None = None  # when set by a test, every get waits for it to open
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        return self.inner.put(data)

    def get(self, sha256: str) -> bytes:
        with self._lock:
            self.gets += 1
            self.in_progress += 1
            self.max_in_progress = max(self.max_in_progress, self.in_progress)
        try:
            if self.gate is not None:
                assert self.gate.wait(60), "the test never opened the gate"
            if self.down:  # after the wait: an outage that takes a while to answer, as a real one does
                raise BlobStoreUnavailable("switched down by the test")
            return self.inner.get(sha256)
        finally:
            with self._lock:
                self.in_progress -= 1

    def exists(self, sha256: str) -> bool:
        return self.inner.exists(sha256)

    def delete(self, sha256: str) -> None:
        self.inner.delete(sha256)


class DictCatalog:
    def __init__(self) -> None:
        self.refs: dict[tuple[str, str], list[PrefixRef]] = {}

    def add(self, blobs: BlobStore, name: str, p: int = 3, seed: int = 0, prefix_id: str = "") -> PrefixRef:
        g = torch.Generator().manual_seed(seed)
        kv = PrefixKV(keys=torch.randn(2, 2, p, 4, generator=g), values=torch.randn(2, 2, p, 4, generator=g))
        sha = blobs.put(encode(kv))
        versions = self.refs.setdefault((TENANT, name), [])
        ref = PrefixRef(TENANT, prefix_id or f"id-{name}", name, len(versions) + 1, sha, p)
        versions.append(ref)
        return ref

    def delete(self, name: str) -> None:
        del self.refs[(TENANT, name)]

    def lookup(self, tenant_id: str, name: str, version: int | None) -> PrefixRef | None:
        versions = self.refs.get((tenant_id, name), [])
        if version is None:
            return versions[-1] if versions else None
        return next((r for r in versions if r.version == version), None)


@pytest.fixture
def blobs(tmp_path: Path) -> CountingBlobs:
    return CountingBlobs(FileBlobStore(tmp_path / "blobs"))


@pytest.fixture
def redis_tiers(redis_url: str) -> Iterator[Callable[[], RedisTier]]:
    """Factory of RedisTier instances (replicas) sharing one test-unique invalidation channel."""
    channel = f"test-inv-{uuid.uuid4().hex}"
    made: list[RedisTier] = []

    def make() -> RedisTier:
        made.append(RedisTier(redis_url, ttl_s=60, max_value_bytes=2**20, channel=channel))
        return made[-1]

    yield make
    for t in made:
        t.close()


def resolver(
    catalog: DictCatalog,
    blobs: BlobStore,
    cache: CacheTier,
    decode: CountingDecode | None = None,
    **kw: object,
) -> PrefixResolver:
    return PrefixResolver(
        catalog=catalog,
        pool=DevicePool(2**20),
        cache=cache,
        blobs=blobs,
        decode=decode or CountingDecode(),
        **kw,  # type: ignore[arg-type]
    )


def test_walk_order_and_write_back(blobs: CountingBlobs, redis_tiers: Callable[[], RedisTier]) -> None:
    catalog = DictCatalog()
    ref = catalog.add(blobs, "support")
    decode = CountingDecode()
    r1 = resolver(catalog, blobs, redis_tiers(), decode)
    first = r1.get(TENANT, "support")
    assert (first.source, first.ref, blobs.gets) == ("blob", ref, 1)
    assert first.kv.keys.shape == (2, 2, 3, 4)
    assert r1.cache.get(ref.key) is not None  # written back to Redis
    assert r1.get(TENANT, "support").source == "device"
    r2 = resolver(catalog, blobs, redis_tiers(), decode)  # another replica: empty pool, same Redis
    assert r2.get(TENANT, "support", version=1).source == "cache"
    assert blobs.gets == 1 and decode.calls == 2
    s1, s2 = r1.stats(), r2.stats()
    assert (s1.device_hits, s1.device_misses, s1.cache_misses, s1.blob_hits, s1.loads) == (1, 1, 1, 1, 1)
    assert (s2.device_misses, s2.cache_hits, s2.blob_hits) == (1, 1, 0)
    assert s1.load_seconds_total > 0


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait for `predicate`; the deadline only turns an event that never comes into a failure, not a hang."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def _concurrent_gets(r: PrefixResolver, blobs: CountingBlobs, n: int) -> tuple[list[PrefixKV], list[BaseException]]:
    """`n` threads get "hot" while the object store holds the first read: all `n` are inside the resolver at
    once (one reading, n - 1 joined to its load) before the read is answered, so the loads surely overlap."""
    blobs.gate = threading.Event()
    results: list[PrefixKV] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(r.get(TENANT, "hot").kv)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        # Without single flight each thread would read on its own: the object store would see n reads waiting.
        _wait(lambda: blobs.in_progress + r.stats().coalesced == n,
              f"{n} concurrent gets in the resolver ({blobs.in_progress} reading, {r.stats().coalesced} joined)")
    finally:
        blobs.gate.set()
        for t in threads:
            t.join()
    return results, errors


def test_single_flight(blobs: CountingBlobs) -> None:
    catalog = DictCatalog()
    catalog.add(blobs, "hot")
    decode = CountingDecode()
    r = resolver(catalog, blobs, InProcessTier(60, 2**20), decode)
    results, errors = _concurrent_gets(r, blobs, 20)
    assert errors == []
    assert (blobs.gets, blobs.max_in_progress, decode.calls) == (1, 1, 1)
    assert r.stats().coalesced == 19
    assert len(results) == 20 and all(kv is results[0] for kv in results)  # one copy on the device


def test_single_flight_shares_failure_then_recovers(blobs: CountingBlobs) -> None:
    catalog = DictCatalog()
    catalog.add(blobs, "hot")
    blobs.down = True
    r = resolver(catalog, blobs, InProcessTier(60, 2**20))
    _, errors = _concurrent_gets(r, blobs, 5)
    assert len(errors) == 5 and all(isinstance(e, PrefixUnavailable) for e in errors)
    assert (blobs.gets, r.stats().coalesced) == (1, 4)  # one outage, one read: the others shared its error
    blobs.down = False
    assert r.get(TENANT, "hot").source == "blob"  # no stuck in-flight entry


def test_redis_down_still_serves(blobs: CountingBlobs) -> None:
    catalog = DictCatalog()
    catalog.add(blobs, "p")
    down = RedisTier(f"redis://127.0.0.1:{closed_port()}/0", ttl_s=60, max_value_bytes=2**20)
    try:
        r = resolver(catalog, blobs, down)
        assert r.get(TENANT, "p").source == "blob"
        assert r.get(TENANT, "p").source == "device"
        assert not down.healthy
        r.invalidate(TENANT, "id-p")  # Redis down: the local eviction still happens
        assert r.get(TENANT, "p").source == "blob"
    finally:
        down.close()


def test_blob_store_down_serves_from_pool_and_cache(
    blobs: CountingBlobs, redis_tiers: Callable[[], RedisTier]
) -> None:
    catalog = DictCatalog()
    catalog.add(blobs, "p")
    catalog.add(blobs, "cold", seed=1)
    r1 = resolver(catalog, blobs, redis_tiers())
    r1.get(TENANT, "p")
    blobs.down = True
    assert r1.get(TENANT, "p").source == "device"
    assert resolver(catalog, blobs, redis_tiers()).get(TENANT, "p").source == "cache"
    with pytest.raises(PrefixUnavailable, match="object store is unavailable"):
        r1.get(TENANT, "cold")  # in no tier
    assert r1.stats().blob_errors == 1


def test_deleted_in_catalog_is_not_found_even_if_in_pool(blobs: CountingBlobs) -> None:
    catalog = DictCatalog()
    ref = catalog.add(blobs, "gone")
    r = resolver(catalog, blobs, InProcessTier(60, 2**20))
    r.get(TENANT, "gone")
    catalog.delete("gone")  # committed, but no invalidation was delivered
    assert ref.key in r.pool
    with pytest.raises(PrefixNotFound):
        r.get(TENANT, "gone")
    with pytest.raises(PrefixNotFound):
        r.get(TENANT, "never-existed")


def test_replaced_version_is_served_at_once(blobs: CountingBlobs) -> None:
    catalog = DictCatalog()
    v1 = catalog.add(blobs, "p", seed=1)
    r = resolver(catalog, blobs, InProcessTier(60, 2**20))
    old = r.get(TENANT, "p")
    v2 = catalog.add(blobs, "p", seed=2)
    new = r.get(TENANT, "p")
    assert (old.ref, new.ref) == (v1, v2)
    assert not torch.equal(old.kv.keys, new.kv.keys)
    assert r.get(TENANT, "p", version=1).ref == v1  # explicit old version still resolvable


def test_load_serves_a_ref_without_the_catalog(blobs: CountingBlobs) -> None:
    """`load(ref)`: the tiers only, for a caller that has just read the ref from the catalog itself."""
    catalog = DictCatalog()
    ref = catalog.add(blobs, "p")
    catalog.delete("p")  # the catalog is not asked: the ref alone names the bytes
    r = resolver(catalog, blobs, InProcessTier(60, 2**20))
    first, again = r.load(ref), r.load(ref)
    assert (first.ref, first.source, again.source) == (ref, "blob", "device")
    assert torch.equal(first.kv.keys, again.kv.keys)


def test_invalidation_evicts_on_other_replica(
    blobs: CountingBlobs, redis_tiers: Callable[[], RedisTier]
) -> None:
    catalog = DictCatalog()
    ref = catalog.add(blobs, "p")
    a, b = resolver(catalog, blobs, redis_tiers()), resolver(catalog, blobs, redis_tiers())
    a.get(TENANT, "p")
    b.get(TENANT, "p")
    assert ref.key in b.pool
    a.invalidate(TENANT, ref.prefix_id)
    deadline = time.monotonic() + 5
    while ref.key in b.pool and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ref.key not in b.pool and ref.key not in a.pool
    assert a.cache.get(ref.key) is None


def test_in_process_invalidation_evicts(blobs: CountingBlobs) -> None:
    catalog = DictCatalog()
    ref = catalog.add(blobs, "p")
    cache = InProcessTier(60, 2**20)
    r = resolver(catalog, blobs, cache)
    r.get(TENANT, "p")
    cache.invalidate(TENANT, ref.prefix_id)  # e.g. the admin API deleting it
    assert ref.key not in r.pool


def test_device_and_dtype(blobs: CountingBlobs) -> None:
    catalog = DictCatalog()
    catalog.add(blobs, "p")
    r = resolver(catalog, blobs, InProcessTier(60, 2**20), device="cpu", dtype=torch.bfloat16)
    kv = r.get(TENANT, "p").kv
    assert kv.keys.dtype == kv.values.dtype == torch.bfloat16
    assert kv.keys.device == torch.device("cpu") and kv.keys.is_contiguous()


def test_corrupt_bytes_are_refused(blobs: CountingBlobs, tmp_path: Path) -> None:
    catalog = DictCatalog()
    ref = catalog.add(blobs, "p")
    cache = InProcessTier(60, 2**20)
    cache.put(ref.key, b"garbage")  # a corrupt cache value: skipped, the blob store answers
    r = resolver(catalog, blobs, cache)
    assert r.get(TENANT, "p").source == "blob"
    assert r.stats().corrupt == 1
    inner = blobs.inner
    assert isinstance(inner, FileBlobStore)
    inner.path_for(ref.sha256).write_bytes(b"bit rot")
    r2 = resolver(catalog, blobs, InProcessTier(60, 2**20))
    with pytest.raises(PrefixUnavailable, match="hash check"):
        r2.get(TENANT, "p")


def test_end_to_end_over_s3_and_redis(s3_server: S3Server, redis_tiers: Callable[[], RedisTier]) -> None:
    s3 = S3BlobStore(
        f"resolver-{uuid.uuid4().hex[:8]}",
        "prefixes",
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    catalog = DictCatalog()
    ref = catalog.add(s3, "p")
    r = resolver(catalog, s3, redis_tiers())
    assert r.get(TENANT, "p").source == "blob"
    assert resolver(catalog, s3, redis_tiers()).get(TENANT, "p").source == "cache"
    assert isinstance(ref.key, PrefixKey)
