"""Everything the running service holds: model, engine, database, prefix tiers. Built in the app's lifespan.

Heavy imports (torch, transformers) happen inside `open_runtime`, never at import time of the web app.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.catalog.refs import DbCatalog
from app.catalog.versions import PrefixStores
from app.config import Settings
from app.db.migrate import head, upgrade
from app.db.session import PoolLimits, make_engine, make_session_factory
from app.engine.protocol import EngineClientProtocol
from app.errors import Unavailable
from app.readiness import Check, StoreChecks, database_checks, describe_url, log_start_up, model_check, open_blobs
from app.schema_gate import SchemaGate, open_schema_gate
from app.services.auth import generate_key
from app.services.db_calls import DbCalls
from app.services.limit_store import CounterStore
from app.services.limits import SLOT_TTL_MARGIN_S
from app.services.stacks import StackLimits
from app.services.training_setup import TrainingContext
from app.threads import run_in_own_thread
from app.training.inprocess import InProcessJobQueue
from app.training.jobs import JobContext
from prefix_store.cache_tier import open_cache_tier

if TYPE_CHECKING:
    from app.engine.loop import Engine
    from app.engine.model import LoadedModel
    from app.jobs.queue import JobQueue
    from prefix_store.blobs import BlobStore
    from prefix_store.cache_tier import CacheTier
    from prefix_store.resolver import PrefixResolver

log = logging.getLogger(__name__)

# The in-process training worker runs one job at a time: a job's writes (heartbeats, events, the publish) and the
# recovery sweep need one connection or two, and, being background work, can wait longer for one than a request.
WORKER_POOL = PoolLimits(size=2, overflow=0, timeout_s=30.0)


@dataclass(frozen=True)
class Runtime:
    """What the running service holds, fixed once `open_runtime` has built it: routes read its parts through
    app/api/deps.py, and nothing sets a field afterwards (a test that serves a fake engine builds a copy with
    `dataclasses.replace`)."""

    settings: Settings
    db: sa.Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    cache: CacheTier
    # The request path's database calls (app/services/db_calls.py): as many threads as the pool keeps open.
    db_calls: DbCalls
    # Rate and concurrency counters: Redis when configured (shared by every replica), else this process.
    counters: CounterStore
    # Whether the database schema is at this build's head; None (no gate) in runtimes built by hand in tests.
    schema_gate: SchemaGate | None = None
    store_checks: StoreChecks | None = None
    admin_key: str | None = None
    # The serving half: None in a process that loads no model (`load_model=False`: migrations, the CLI).
    model: LoadedModel | None = None
    engine: Engine | None = None
    resolver: PrefixResolver | None = None
    engine_client: EngineClientProtocol | None = None
    # Hands created training jobs to workers; None: jobs stay `queued` for a worker's sweep to pick up.
    job_queue: JobQueue | None = None

    def prefix_stores(self) -> PrefixStores:
        """The stores prefix management writes to; invalidation goes through the resolver (device pool + cache
        tier) when this process serves, else straight to the cache tier."""
        resolver = self.resolver
        invalidate = resolver.invalidate if resolver is not None else self.cache.invalidate
        return PrefixStores(blobs=self.blobs, spec=self.model.spec if self.model is not None else None,
                            max_virtual_tokens=self.settings.max_virtual_tokens,
                            max_bytes=self.settings.max_upload_bytes, invalidate=invalidate)

    def training_context(self) -> TrainingContext:
        """The served model's facts for creating training jobs; 503 while the model is not loaded (examples are
        checked with its tokenizer)."""
        from app.engine.factory import context_length  # imports torch: app.runtime stays torch-free at import

        loaded = self.model
        if loaded is None:
            raise Unavailable("the model is not loaded yet", headers={"Retry-After": "5"})
        return TrainingContext(
            blobs=self.blobs, tokenizer=loaded.tokenizer, context_length=context_length(loaded),
            base_model_id=loaded.spec.model_id, fingerprint=loaded.spec.fingerprint,
            max_virtual_tokens=self.settings.max_virtual_tokens, max_file_examples=self.settings.max_file_examples,
            stacking=StackLimits.of(self.settings))

    def database_ok(self) -> bool:
        try:
            with self.db.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except sa.exc.SQLAlchemyError:
            return False

    def _database_checks(self) -> dict[str, Check]:
        return database_checks(self.settings, answers=self.database_ok(), schema_gate=self.schema_gate)

    def readiness(self) -> dict[str, Check]:
        """Every check serving needs, by name (app/readiness.py); ready when all pass."""
        checks = {"model": model_check(self.model, self.engine), **self._database_checks()}
        if self.store_checks is not None:
            checks["object_store"] = self.store_checks.object_store()
            cache = self.store_checks.cache()
            if cache is not None:
                checks["cache"] = cache
        return checks

    def close(self) -> None:
        """Stop the engine and close the stores. `await job_queue.close()` first, on the event loop that used
        it (the app's lifespan does); an in-process training worker still running is stopped here."""
        stop = getattr(self.job_queue, "stop", None)
        if callable(stop):
            stop()
        if self.engine is not None:
            self.engine.stop()
        self.db_calls.close()
        self.counters.close()
        if self.store_checks is not None:
            self.store_checks.close()
        close = getattr(self.cache, "close", None)
        if callable(close):
            close()
        self.db.dispose()


def open_runtime(settings: Settings, *, load_model: bool = True) -> Runtime:
    """Open the stores and (optionally) load the model and start the engine thread."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url
    if settings.database_url is None:
        # The embedded SQLite default is this process's own: it migrates itself.
        upgrade(url)
    elif settings.migrate_on_start:
        # A shared database, migrated here only because the operator asked; env.py's advisory lock makes
        # replicas starting together take turns, and the later ones find it at head and do nothing.
        log.info("PREFIXSERVE_MIGRATE_ON_START: migrating %s to revision %s", describe_url(url), head())
        upgrade(url)
    db = make_engine(url, pool=PoolLimits(size=settings.database_pool_size,
                                          overflow=settings.database_max_overflow,
                                          timeout_s=settings.database_pool_timeout_s))
    sessions = make_session_factory(db)
    blobs = open_blobs(settings)
    cache = open_cache_tier(settings.redis_url, ttl_s=settings.redis_ttl_s,
                            max_value_bytes=settings.redis_max_value_bytes)
    runtime = Runtime(
        settings=settings,
        db=db,
        sessions=sessions,
        blobs=blobs,
        cache=cache,
        db_calls=DbCalls(sessions, threads=settings.database_pool_size, wait_s=settings.database_pool_timeout_s),
        counters=CounterStore(settings.redis_url, slot_ttl_s=settings.request_timeout_s + SLOT_TTL_MARGIN_S),
        # Otherwise a schema behind this build would answer 500s (missing tables) while /readyz said ready.
        schema_gate=open_schema_gate(db),
        store_checks=StoreChecks(settings, blobs),
        admin_key=_admin_key(settings),
        **(_serving_parts(settings, sessions=sessions, cache=cache, blobs=blobs) if load_model else {}),
    )
    if load_model:  # the in-process worker trains with the loaded model, so the queue comes last
        runtime = replace(runtime, job_queue=open_job_queue(runtime))
    log_start_up(settings, runtime._database_checks(), runtime.store_checks)
    return runtime


def _admin_key(settings: Settings) -> str | None:
    """PREFIXSERVE_ADMIN_KEY, or on the embedded default one generated at first start (0600 in the data dir)."""
    if settings.admin_key:
        return settings.admin_key
    if settings.database_url is not None:
        log.warning("PREFIXSERVE_ADMIN_KEY is not set: admin endpoints are disabled")
        return None
    path = (settings.data_dir / "admin_key").resolve()
    if path.exists():
        log.info("admin key: in %s (read it with `cat %s`)", path, path)
        return path.read_text().strip()
    key = generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    # Never the key itself: logs are collected, shipped and kept where a key must not be.
    log.warning("generated an admin key, saved with mode 0600 in %s: read it with `cat %s`", path, path)
    return key


def load_base_model(settings: Settings, *, torch_threads: int | None = None) -> LoadedModel:
    """The frozen base model the settings name (no engine): the server's and the training workers' model."""
    # torch and transformers: only a process that loads the model imports them
    import torch

    from app.engine.model import load_model  # the same reason

    if torch_threads:
        torch.set_num_threads(torch_threads)
    return load_model(
        settings.model,
        data_dir=settings.data_dir,
        device=settings.device,
        dtype=settings.dtype,
        allow_hub_download=settings.allow_hub_download,
        name=settings.model_name,
    )


def _serving_parts(settings: Settings, *, sessions: sessionmaker[Session], cache: CacheTier,
                   blobs: BlobStore) -> dict[str, Any]:
    """Load the model and start the engine thread: Runtime's model, resolver, engine and engine_client."""
    # torch: only a process that loads the model imports the engine, the device pool and the resolver
    from app.engine.client import EngineClient
    from app.engine.factory import build_engine, context_length  # the same reason
    from prefix_store.device_pool import DevicePool  # the same reason
    from prefix_store.resolver import PrefixResolver  # the same reason

    s = settings
    # Loading and packing run parallel torch ops: on a thread that ends, so no OpenMP pool outlives them.
    loaded = run_in_own_thread(lambda: load_base_model(s, torch_threads=s.torch_threads), name="model-load")
    resolver = PrefixResolver(
        catalog=DbCatalog(sessions),
        pool=DevicePool(s.device_pool_bytes),
        cache=cache,
        blobs=blobs,
        device=loaded.device,
        dtype=loaded.dtype,
        spec=loaded.spec,
        max_virtual_tokens=s.max_virtual_tokens,
        max_bytes=s.max_upload_bytes,
    )
    engine = run_in_own_thread(lambda: build_engine(loaded, **engine_options(s)), name="model-load")
    engine.start()
    client = EngineClient(engine, loaded.tokenizer, resolver, loaded.spec.model_id, context_length(loaded))
    log.info("model %s loaded (%s, %s); engine started", loaded.spec.model_id, loaded.device, loaded.dtype)
    return {"model": loaded, "resolver": resolver, "engine": engine, "engine_client": client}


def engine_options(settings: Settings) -> dict[str, Any]:
    """`build_engine`'s keyword arguments from the settings."""
    return {"packed_linears": settings.cpu_packed_linears, "weights": settings.weights,
            "max_batch_rows": settings.max_batch_rows,
            "max_batch_tokens": settings.max_batch_tokens, "max_waiting": settings.max_waiting,
            "request_timeout_s": settings.request_timeout_s}


def job_context(runtime: Runtime, *, loaded: LoadedModel | None = None,
                sessions: sessionmaker[Session] | None = None, **kw: Any) -> JobContext:
    """What running a training job needs, cut from the runtime (`loaded`: a worker's own model copy;
    `sessions`: connections of its own instead of the serving pool's)."""
    model = loaded or runtime.model
    if model is None:
        raise ValueError("a job context needs the loaded model")
    invalidate = runtime.resolver.invalidate if runtime.resolver is not None else runtime.cache.invalidate
    return JobContext(sessions=sessions or runtime.sessions, blobs=runtime.blobs, loaded=model,
                      settings=runtime.settings, invalidate=invalidate, **kw)


def _worker_sessions(runtime: Runtime) -> tuple[sessionmaker[Session], sa.Engine | None]:
    """The in-process training worker's own connections (and the engine to dispose, if new): a burst of requests
    that holds every connection of the serving pool must not starve training or its recovery sweep. An in-memory
    SQLite database exists only in the serving engine's one connection, so it is shared."""
    url = runtime.settings.resolved_database_url
    if runtime.db.url.get_backend_name() == "sqlite" and runtime.db.url.database in (None, "", ":memory:"):
        return runtime.sessions, None
    db = make_engine(url, pool=WORKER_POOL)
    return make_session_factory(db), db


def open_job_queue(runtime: Runtime) -> JobQueue | None:
    """The queue the settings ask for; the in-process worker is started here (it needs the loaded model).
    None (`job_queue = none`, or no model to train with): this process runs no jobs, and created jobs stay
    `queued` in the database until a worker's recovery sweep (every `job_sweep_interval_s`) picks them up."""
    kind = runtime.settings.resolved_job_queue
    if kind == "arq":
        from app.training.arq_queue import ArqJobQueue  # arq: only a process whose job queue is arq needs it

        url = runtime.settings.redis_url
        if url is None:  # Settings refuses job_queue=arq without a Redis URL; auto picks arq only with one
            raise ValueError("the arq job queue needs PREFIXSERVE_REDIS_URL")
        return ArqJobQueue(url)
    if kind == "inprocess" and runtime.model is not None:
        gate = runtime.schema_gate
        sessions, worker_db = _worker_sessions(runtime)
        queue = InProcessJobQueue(job_context(runtime, sessions=sessions),
                                  schema_ready=None if gate is None else lambda: gate.check().ok,
                                  on_stop=worker_db.dispose if worker_db is not None else None)
        queue.start()
        return queue
    if kind == "inprocess":
        log.warning("no model loaded: the in-process training worker is not started")
    return None
