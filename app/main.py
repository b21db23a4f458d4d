"""The ASGI app. `create_app` is cheap: the model, engine and stores are opened in the lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.middleware.cors import CORSMiddleware

from app.api.routes import (
    admin,
    batches,
    chat,
    completions,
    files,
    fine_tuning,
    health,
    models,
    prefixes,
    usage,
    users,
)
from app.batches.runner import BatchRunner
from app.config import Settings, load_settings
from app.console import mount_console
from app.errors import install_handlers
from app.observability.metrics import CONTENT_TYPE, Metrics
from app.observability.middleware import ObservabilityMiddleware
from app.protocol.errors import ERROR_RESPONSES
from app.runtime import Runtime, open_runtime
from app.schema_gate import SchemaGate, SchemaGateMiddleware


def create_app(
    settings: Settings | None = None, *, runtime_factory: Callable[[Settings], Runtime] | None = None
) -> FastAPI:
    """The FastAPI app. `runtime_factory` replaces `open_runtime` (tests use it to skip the model)."""
    cfg = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if runtime_factory is None:
            factory: Callable[[Settings], Runtime] = open_runtime
        else:
            factory = runtime_factory
        runtime = await asyncio.to_thread(factory, cfg)
        app.state.runtime = runtime
        if metrics is not None and runtime.resolver is not None:
            runtime.resolver.load_observer = metrics.observe_prefix_load
        runner = await _start_batch_runner(app, runtime)
        try:
            yield
        finally:
            if runner is not None:
                # Before the engine stops: requests in flight are cancelled, finished ones recorded, batches
                # handed back for another replica (or this server's next start) to resume.
                await runner.stop()
            if runtime.job_queue is not None:
                # On this loop: the arq pool was opened on it; the in-process worker hands its job back.
                await runtime.job_queue.close()
            await asyncio.to_thread(runtime.close)

    app = FastAPI(title="prefixserve", version="0.1.0", lifespan=lifespan)
    # One registry per app (tests build many apps in one process); collectors find the runtime at scrape time.
    metrics = Metrics(lambda: getattr(app.state, "runtime", None)) if cfg.metrics_enabled else None

    def schema_gate() -> SchemaGate | None:
        return getattr(getattr(app.state, "runtime", None), "schema_gate", None)

    # Added first, so it runs inside the observability middleware: its 503s are logged and counted.
    app.add_middleware(SchemaGateMiddleware, gate=schema_gate)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, log_prompts=cfg.log_prompts)
    if cfg.cors_origins:
        # Closed by default: no CORS headers unless origins are configured. Keys travel in the Authorization
        # header, never in cookies, so credentials stay off.
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins,
                           allow_methods=["GET", "POST", "PUT", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    install_handlers(app)
    if metrics is not None:
        _add_metrics_route(app, metrics)
    app.include_router(health.router)
    for module in (completions, chat, models, prefixes, files, batches, fine_tuning, users, usage, admin):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    if cfg.console:
        mount_console(app)
    return app


async def _start_batch_runner(app: FastAPI, runtime: Runtime) -> BatchRunner | None:
    """The Batch API's runner (app/batches), on this event loop, where a process serves the model; the routes
    wake it through `app.state.wake_batches` when they create or cancel a batch."""
    if runtime.engine_client is None or runtime.settings.batch_concurrency == 0:
        return None
    gate = runtime.schema_gate
    runner = BatchRunner(
        settings=runtime.settings, db_calls=runtime.db_calls, blobs=runtime.blobs, engine=runtime.engine_client,
        counters=runtime.counters,
        fingerprint=lambda: runtime.model.spec.fingerprint if runtime.model is not None else None,
        schema_ready=None if gate is None else lambda: gate.check().ok)
    await runner.start()
    app.state.batch_runner = runner
    app.state.wake_batches = runner.wake
    return runner


def _add_metrics_route(app: FastAPI, metrics: Metrics) -> None:
    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        """Prometheus text format; unauthenticated (switch off with PREFIXSERVE_METRICS_ENABLED=false).
        A sync route: the training-jobs collector queries the database, so it runs in the thread pool."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)
