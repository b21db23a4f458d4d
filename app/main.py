"""The ASGI app. `create_app` is cheap: the model, engine and stores are opened in the lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from app.api.routes import admin, chat, completions, health, models, prefixes
from app.config import Settings, load_settings
from app.errors import install_handlers

if TYPE_CHECKING:
    from app.runtime import Runtime


def create_app(
    settings: Settings | None = None, *, runtime_factory: Callable[[Settings], Runtime] | None = None
) -> FastAPI:
    """The FastAPI app. `runtime_factory` replaces `open_runtime` (tests use it to skip the model)."""
    cfg = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if runtime_factory is None:
            from app.runtime import open_runtime

            factory: Callable[[Settings], Runtime] = open_runtime
        else:
            factory = runtime_factory
        runtime = await asyncio.to_thread(factory, cfg)
        app.state.runtime = runtime
        try:
            yield
        finally:
            await asyncio.to_thread(runtime.close)

    app = FastAPI(title="prefixserve", version="0.1.0", lifespan=lifespan)
    install_handlers(app)
    app.include_router(health.router)
    for module in (completions, chat, models, prefixes, admin):
        app.include_router(module.router)
    return app
