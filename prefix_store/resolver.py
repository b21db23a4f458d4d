"""The prefix resolver: name → PrefixKV (or SoftPrompt) on the model's device, through the tiers of docs/storage.md.

Walk: catalog (always) → device pool → cache tier (Redis or in-process) → blob store.

- The catalog (the database) is consulted on every call for the name → (prefix id, version, hash) mapping, so
  once a delete or replacement commits, the old tensors are never served again, whatever pub/sub does;
  invalidation messages only free memory early.
- Tensors are cached by the immutable PrefixKey, so no tier can hold a stale value for a key.
- Single flight: concurrent cold gets of one key share one blob read and one decode.
- Tier outages degrade, never fail: Redis down → straight to the blob store; blob store down → whatever the
  device pool and cache tier still hold.

Thread-safe; the engine calls it from its own thread (no asyncio here).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from prefix_store.blobs import BlobNotFound, BlobStore, BlobStoreUnavailable, sha256_hex
from prefix_store.cache_tier import CacheTier, PrefixKey
from prefix_store.device_pool import DevicePool
from prefix_store.ref import PrefixRef
from prefix_store.stack import concat_prefixes
from prefix_store.types import ModelSpec, PrefixError, PrefixKV, PrefixTensors, SoftPrompt

log = logging.getLogger(__name__)

Source = Literal["device", "cache", "blob"]
DecodeFn = Callable[[bytes], PrefixTensors]
"""A stored prefix version's bytes → PrefixKV or SoftPrompt (validated against the served model)."""
LoadObserver = Callable[[Source, float], None]
"""Told (source, seconds) after each successful load; the app feeds it to a latency histogram."""


class PrefixNotFound(LookupError):
    """The catalog has no such prefix (or version) for this tenant."""


class PrefixUnavailable(RuntimeError):
    """The catalog knows the prefix but no tier can produce its bytes right now (or they are corrupt)."""


class Catalog(Protocol):
    """The name → ref mapping. version None means the current (latest live) version."""

    def lookup(self, tenant_id: str, name: str, version: int | None) -> PrefixRef | None: ...


@dataclass(frozen=True)
class ResolvedPrefix:
    """A prefix ready for the engine. kv: keys/values [num_layers, num_kv_heads, P, head_dim] on the device, or a
    soft prompt's embeddings [P, hidden]."""

    ref: PrefixRef
    kv: PrefixTensors
    source: Source


@dataclass
class ResolverStats:
    """Per-tier counters and load latency (a load = cache-tier or blob read + decode + move to device)."""

    device_hits: int = 0
    device_misses: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    blob_hits: int = 0
    blob_misses: int = 0  # the catalog points at a blob that is gone
    blob_errors: int = 0  # the blob store was unreachable
    corrupt: int = 0  # bytes whose hash did not match the catalog
    coalesced: int = 0  # gets that waited on another thread's load instead of loading
    loads: int = 0
    load_seconds_total: float = 0.0
    load_seconds_max: float = 0.0


def default_decode(spec: ModelSpec | None, *, max_virtual_tokens: int, max_bytes: int) -> DecodeFn:
    """codec.decode_stored bound to the served model's limits (imported lazily, at first use)."""

    def decode(data: bytes) -> PrefixTensors:
        # the codec (and safetensors) load at the first decode: a resolver given its own decode never needs it
        from prefix_store.codec import decode_stored

        return decode_stored(data, spec=spec, max_virtual_tokens=max_virtual_tokens, max_bytes=max_bytes)

    return decode


class PrefixResolver:
    """Resolve (tenant, name, version) to a PrefixKV on `device` in `dtype` (None: keep the stored dtype)."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        pool: DevicePool,
        cache: CacheTier,
        blobs: BlobStore,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        decode: DecodeFn | None = None,
        spec: ModelSpec | None = None,
        max_virtual_tokens: int = 256,
        max_bytes: int = 64 * 2**20,
    ) -> None:
        self.catalog = catalog
        self.pool = pool
        self.cache = cache
        self.blobs = blobs
        self.device = torch.device(device)
        self.dtype = dtype
        self._decode = decode or default_decode(
            spec, max_virtual_tokens=max_virtual_tokens, max_bytes=max_bytes
        )
        self._lock = threading.Lock()
        self._inflight: dict[PrefixKey, Future[PrefixTensors]] = {}
        self._stats = ResolverStats()
        # Optional: set by the app for its metrics (this package stays free of prometheus and the app).
        self.load_observer: LoadObserver | None = None
        # Other replicas' deletes/replacements free our device memory; correctness does not depend on it.
        cache.subscribe(self._on_invalidation)

    def get(self, tenant_id: str, name: str, version: int | None = None) -> ResolvedPrefix:
        """The prefix named `name` (latest version if None), on the device.

        Raise PrefixNotFound if the catalog has nothing, PrefixUnavailable if no tier can produce the bytes,
        PrefixError (from the codec) if the stored prefix does not fit the served model.
        """
        ref = self.catalog.lookup(tenant_id, name, version)
        if ref is None:
            what = f"{name!r}" if version is None else f"{name!r} version {version}"
            raise PrefixNotFound(f"no prefix {what} for tenant {tenant_id!r}")
        return self.load(ref)

    def load(self, ref: PrefixRef) -> ResolvedPrefix:
        """The prefix version `ref` on the device, without asking the catalog: for a caller that has just read
        `ref` from the catalog itself (the key holds the content hash, so no tier can answer stale bytes).
        Raises as `get` does, PrefixNotFound aside."""
        key = ref.key
        kv = self.pool.get(key)
        if kv is not None:
            self._count("device_hits")
            return ResolvedPrefix(ref, kv, "device")
        self._count("device_misses")
        kv, source = self._load_once(ref)
        return ResolvedPrefix(ref, kv, source)

    def load_stack(self, refs: Sequence[PrefixRef]) -> PrefixKV:
        """A stack of prefix versions as one PrefixKV [L, H_kv, P1 + P2 + ..., D] (prefix_store/stack.py): each
        part through `load` (device pool, single flight), concatenated per request. Not cached per stack: the
        copy costs microseconds next to a prefill, and a cached stack would hold every part's bytes twice.

        A soft prompt never stacks (docs/prefix-format.md, "Soft prompts"): PrefixError when a part is one (the API
        refuses such a stack before it gets here)."""
        parts = [self.load(ref).kv for ref in refs]
        kv_parts = [p for p in parts if isinstance(p, PrefixKV)]
        if len(kv_parts) != len(parts):
            soft = [r.name for r, p in zip(refs, parts, strict=True) if isinstance(p, SoftPrompt)]
            raise PrefixError(f"soft prompts cannot be stacked with other prefixes: {soft}")
        return concat_prefixes(kv_parts)

    def invalidate(self, tenant_id: str, prefix_id: str) -> None:
        """After a delete/replacement has committed: free it here and tell every other replica."""
        self.pool.evict_prefix(tenant_id, prefix_id)
        self.cache.invalidate(tenant_id, prefix_id)

    def stats(self) -> ResolverStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    def _on_invalidation(self, tenant_id: str, prefix_id: str) -> None:
        n = self.pool.evict_prefix(tenant_id, prefix_id)
        log.debug("invalidation of %s/%s evicted %d device pool entries", tenant_id, prefix_id, n)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._stats, name, getattr(self._stats, name) + n)

    def _load_once(self, ref: PrefixRef) -> tuple[PrefixTensors, Source]:
        """Load `ref` unless another thread is already loading it; then wait for that load instead."""
        key = ref.key
        with self._lock:
            future = self._inflight.get(key)
            leader = future is None
            if future is None:
                # Re-check under the lock: a load may have finished between our pool miss and now.
                kv = self.pool.get(key, record=False)
                if kv is not None:
                    return kv, "device"
                future = self._inflight[key] = Future()
            else:
                self._stats.coalesced += 1
        if not leader:
            kv = future.result()  # re-raises the leader's error: one outage, one error per waiter
            # put() returns the pool's copy, re-inserting it if it was evicted meanwhile.
            return self.pool.put(key, kv), "device"
        try:
            kv, source = self._load(ref)
            kv = self.pool.put(key, kv)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(kv)
        finally:
            with self._lock:
                del self._inflight[key]
        return kv, source

    def _load(self, ref: PrefixRef) -> tuple[PrefixTensors, Source]:
        """Bytes from the cache tier or the blob store (writing back), decoded and moved to the device."""
        started = time.perf_counter()
        key = ref.key
        source: Source = "cache"
        data = self.cache.get(key)
        if data is not None and sha256_hex(data) != ref.sha256:
            log.warning("cache tier returned corrupt bytes for %s; reading the blob store", key.redis_key)
            self._count("corrupt")
            data = None
        if data is not None:
            self._count("cache_hits")
        else:
            self._count("cache_misses")
            source = "blob"
            data = self._read_blob(ref)
            self.cache.put(key, data)  # write back; never raises, skipped if too big or the tier is down
        kv = self._to_device(self._decode(data))
        if kv.num_virtual_tokens != ref.num_virtual_tokens:
            raise PrefixUnavailable(
                f"prefix {ref.name!r} v{ref.version}: stored blob has {kv.num_virtual_tokens} virtual "
                f"tokens, the catalog says {ref.num_virtual_tokens}"
            )
        elapsed = time.perf_counter() - started
        with self._lock:
            self._stats.loads += 1
            self._stats.load_seconds_total += elapsed
            self._stats.load_seconds_max = max(self._stats.load_seconds_max, elapsed)
        if self.load_observer is not None:
            self.load_observer(source, elapsed)
        log.debug("loaded %s from %s in %.1f ms", key.redis_key, source, elapsed * 1e3)
        return kv, source

    def _read_blob(self, ref: PrefixRef) -> bytes:
        try:
            data = self.blobs.get(ref.sha256)
        except BlobNotFound:
            self._count("blob_misses")
            log.error(
                "blob %s of prefix %s/%s is missing from %r",
                ref.sha256,
                ref.tenant_id,
                ref.prefix_id,
                self.blobs,
            )
            raise PrefixUnavailable(
                f"prefix {ref.name!r} v{ref.version}: its stored data is missing"
            ) from None
        except BlobStoreUnavailable as exc:
            self._count("blob_errors")
            raise PrefixUnavailable(
                f"prefix {ref.name!r} v{ref.version} is not cached and the object store is unavailable"
            ) from exc
        if sha256_hex(data) != ref.sha256:
            self._count("corrupt")
            raise PrefixUnavailable(f"prefix {ref.name!r} v{ref.version}: stored data fails its hash check")
        self._count("blob_hits")
        return data

    def _to_device(self, kv: PrefixTensors) -> PrefixTensors:
        """Cast and move keys/values (or a soft prompt's embeddings) to the model's device and dtype, contiguous,
        detached."""
        if isinstance(kv, SoftPrompt):
            dtype = self.dtype or kv.embeddings.dtype
            return dataclasses.replace(
                kv, embeddings=kv.embeddings.detach().to(device=self.device, dtype=dtype).contiguous())
        dtype = self.dtype or kv.keys.dtype
        return dataclasses.replace(
            kv,
            keys=kv.keys.detach().to(device=self.device, dtype=dtype).contiguous(),
            values=kv.values.detach().to(device=self.device, dtype=dtype).contiguous(),
        )
