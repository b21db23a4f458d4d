"""Everything the running service holds: model, engine, database, prefix tiers. Built in the app's lifespan.

Heavy imports (torch, transformers) happen inside `open_runtime`, never at import time of the web app.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings

if TYPE_CHECKING:
    from app.engine.client import EngineClient
    from app.engine.loop import Engine
    from app.engine.model import LoadedModel
    from app.training.queue import JobQueue
    from prefix_store.blobs import BlobStore
    from prefix_store.cache_tier import CacheTier
    from prefix_store.resolver import PrefixResolver

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    db: sa.Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    cache: CacheTier
    model: LoadedModel | None = None
    engine: Engine | None = None
    resolver: PrefixResolver | None = None
    engine_client: EngineClient | None = None
    admin_key: str | None = None
    # Hands created training jobs to workers; None: jobs stay `queued` for a worker's sweep to pick up.
    job_queue: JobQueue | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def database_ok(self) -> bool:
        try:
            with self.db.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except sa.exc.SQLAlchemyError:
            return False

    def readiness(self) -> dict[str, bool]:
        return {
            "model": self.model is not None and self.engine is not None and self.engine.alive,
            "database": self.database_ok(),
        }

    def close(self) -> None:
        """Stop the engine and close the stores. `await job_queue.close()` first, on the event loop that used
        it (the app's lifespan does); an in-process training worker still running is stopped here."""
        stop = getattr(self.job_queue, "stop", None)
        if callable(stop):
            stop()
        if self.engine is not None:
            self.engine.stop()
        close = getattr(self.cache, "close", None)
        if callable(close):
            close()
        self.db.dispose()


def open_runtime(settings: Settings, *, load_model: bool = True) -> Runtime:
    """Open the stores and (optionally) load the model and start the engine thread."""
    from app.db.migrate import upgrade
    from app.db.session import make_engine, make_session_factory
    from prefix_store.blobs import open_blob_store
    from prefix_store.cache_tier import open_cache_tier

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url
    if settings.database_url is None:
        # The embedded SQLite default migrates itself; production runs `prefixserve migrate` once.
        upgrade(url)
    db = make_engine(url)
    runtime = Runtime(
        settings=settings,
        db=db,
        sessions=make_session_factory(db),
        blobs=open_blob_store(
            settings.resolved_object_store_url,
            endpoint_url=settings.s3_endpoint_url,
            access_key=settings.s3_access_key_id,
            secret_key=settings.s3_secret_access_key,
            region=settings.s3_region,
        ),
        cache=open_cache_tier(
            settings.redis_url, ttl_s=settings.redis_ttl_s, max_value_bytes=settings.redis_max_value_bytes
        ),
    )
    runtime.admin_key = _admin_key(settings)
    if load_model:
        _start_model(runtime)
        from app.training.queue import open_job_queue

        runtime.job_queue = open_job_queue(runtime)
    return runtime


def _admin_key(settings: Settings) -> str | None:
    """PREFIXSERVE_ADMIN_KEY, or on the embedded default one generated at first start (0600 in the data dir)."""
    if settings.admin_key:
        return settings.admin_key
    if settings.database_url is not None:
        log.warning("PREFIXSERVE_ADMIN_KEY is not set: admin endpoints are disabled")
        return None
    import os

    from app.services.auth import generate_key

    path = settings.data_dir / "admin_key"
    if path.exists():
        return path.read_text().strip()
    key = generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    # Shown once, on the console of the operator who started the embedded server.
    log.warning("generated the admin key %s (saved with mode 0600 in %s)", key, path)
    return key


def load_base_model(settings: Settings, *, torch_threads: int | None = None) -> LoadedModel:
    """The frozen base model the settings name (no engine): the server's and the training workers' model."""
    import torch

    from app.engine.model import load_model

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


def _start_model(runtime: Runtime) -> None:
    from app.engine.client import EngineClient
    from app.engine.factory import build_engine, context_length
    from app.engine.threads import run_in_own_thread
    from app.services.catalog import DbCatalog
    from prefix_store.device_pool import DevicePool
    from prefix_store.resolver import PrefixResolver

    s = runtime.settings
    # Loading and packing run parallel torch ops: on a thread that ends, so no OpenMP pool outlives them.
    loaded = run_in_own_thread(lambda: load_base_model(s, torch_threads=s.torch_threads), name="model-load")
    runtime.model = loaded
    runtime.resolver = PrefixResolver(
        catalog=DbCatalog(runtime.sessions),
        pool=DevicePool(s.device_pool_bytes),
        cache=runtime.cache,
        blobs=runtime.blobs,
        device=loaded.device,
        dtype=loaded.dtype,
        spec=loaded.spec,
        max_virtual_tokens=s.max_virtual_tokens,
        max_bytes=s.max_upload_bytes,
    )
    runtime.engine = run_in_own_thread(lambda: build_engine(loaded, settings=s), name="model-load")
    runtime.engine.start()
    runtime.engine_client = EngineClient(
        runtime.engine, loaded.tokenizer, runtime.resolver, loaded.spec.model_id, context_length(loaded)
    )
    log.info("model %s loaded (%s, %s); engine started", loaded.spec.model_id, loaded.device, loaded.dtype)
