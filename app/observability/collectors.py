"""Prometheus collectors that read the running service's own counters at scrape time.

The engine, the resolver and the device pool keep plain counters (they must not import prometheus); these
collectors turn a snapshot of them into metric families when Prometheus scrapes. Every family is emitted even
when its source is absent (no model loaded yet, a fake engine in tests), with no samples, so the set of metric
names a replica exports never depends on its state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

import sqlalchemy as sa
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.db.models import JOB_STATUSES, TrainingJob

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from app.engine.loop import Engine
    from prefix_store.resolver import PrefixResolver

log = logging.getLogger(__name__)


class Observed(Protocol):
    """What the collectors read of the running service (app/runtime.py's Runtime) at each scrape."""

    engine: Engine | None
    resolver: PrefixResolver | None
    sessions: sessionmaker[Session]


RuntimeSource = Callable[[], "Observed | None"]


class EngineCollector(Collector):
    """Batch size, waiting-queue depth and step counters of the scheduler thread (`Engine.stats`)."""

    def __init__(self, runtime: RuntimeSource) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        rt = self._runtime()
        engine = rt.engine if rt is not None else None
        batch = GaugeMetricFamily("prefixserve_engine_batch_size", "Rows in the running batch.")
        waiting = GaugeMetricFamily("prefixserve_engine_waiting_requests",
                                    "Requests submitted but not yet admitted into the batch.")
        max_rows = GaugeMetricFamily("prefixserve_engine_max_batch_rows", "The batch row budget.")
        steps = CounterMetricFamily("prefixserve_engine_decode_steps", "Decode steps run.")
        prefills = CounterMetricFamily("prefixserve_engine_prefills", "Prefill forwards run.")
        tokens = CounterMetricFamily("prefixserve_engine_generated_tokens", "Tokens sampled by the engine.")
        preempted = CounterMetricFamily("prefixserve_engine_preempted_rows",
                                        "Batch-priority rows that gave their place up to an interactive request.")
        if engine is not None:
            s = engine.stats  # plain ints written by the engine thread; a torn read is one step stale at worst
            batch.add_metric([], s.running_rows)
            waiting.add_metric([], s.waiting)
            max_rows.add_metric([], engine.limits.max_batch_rows)
            steps.add_metric([], s.steps)
            prefills.add_metric([], s.prefills)
            tokens.add_metric([], s.generated_tokens)
            preempted.add_metric([], s.preempted)
        yield from (batch, waiting, max_rows, steps, prefills, tokens, preempted)


class PrefixTierCollector(Collector):
    """Hits and misses per prefix tier (device pool, cache tier = Redis or in-process, object store) and the
    device pool's occupancy, from `PrefixResolver.stats()` and `DevicePool.stats()`."""

    def __init__(self, runtime: RuntimeSource) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        rt = self._runtime()
        resolver = rt.resolver if rt is not None else None
        hits = CounterMetricFamily("prefixserve_prefix_cache_hits", "Prefix lookups answered by a tier.",
                                   labels=["tier"])
        misses = CounterMetricFamily("prefixserve_prefix_cache_misses", "Prefix lookups a tier could not answer.",
                                     labels=["tier"])
        errors = CounterMetricFamily("prefixserve_prefix_load_errors", "Prefix loads that failed, by reason.",
                                     labels=["reason"])
        coalesced = CounterMetricFamily("prefixserve_prefix_loads_coalesced",
                                        "Cold lookups that waited for another thread's load (single flight).")
        pool_bytes = GaugeMetricFamily("prefixserve_device_pool_bytes", "Bytes of prefixes held on the device.")
        pool_cap = GaugeMetricFamily("prefixserve_device_pool_capacity_bytes", "The device pool's byte bound.")
        pool_entries = GaugeMetricFamily("prefixserve_device_pool_entries", "Prefixes held on the device.")
        evictions = CounterMetricFamily("prefixserve_device_pool_evictions", "Prefixes evicted from the pool.")
        if resolver is not None:
            r = resolver.stats()
            for tier, hit, miss in (("device_pool", r.device_hits, r.device_misses),
                                    ("cache", r.cache_hits, r.cache_misses),
                                    ("object_store", r.blob_hits, r.blob_misses)):
                hits.add_metric([tier], hit)
                misses.add_metric([tier], miss)
            errors.add_metric(["object_store_unavailable"], r.blob_errors)
            errors.add_metric(["corrupt"], r.corrupt)
            coalesced.add_metric([], r.coalesced)
            p = resolver.pool.stats()
            pool_bytes.add_metric([], p.bytes)
            pool_cap.add_metric([], p.max_bytes)
            pool_entries.add_metric([], p.entries)
            evictions.add_metric([], p.evictions)
        yield from (hits, misses, errors, coalesced, pool_bytes, pool_cap, pool_entries, evictions)


class TrainingJobsCollector(Collector):
    """Training jobs by state: one grouped COUNT over the (status, created_at) index per scrape."""

    def __init__(self, runtime: RuntimeSource) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("prefixserve_training_jobs", "Training jobs in the database, by state.",
                                 labels=["state"])
        rt = self._runtime()
        if rt is not None:
            try:
                with rt.sessions() as session:
                    rows = session.execute(
                        sa.select(TrainingJob.status, sa.func.count()).group_by(TrainingJob.status)
                    ).all()
            except sa.exc.SQLAlchemyError as exc:  # a scrape must not fail because the database blinked
                log.warning("training job metrics skipped: %s", type(exc).__name__)
            else:
                counts = {str(status): int(n) for status, n in rows}
                for state in JOB_STATUSES:
                    jobs.add_metric([state], counts.get(state, 0))
        yield jobs
