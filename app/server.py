"""`prefixserve serve`: uvicorn with a bounded graceful shutdown.

On SIGTERM (or Ctrl-C) uvicorn closes the listening socket (new connections are refused) and waits for the
requests in flight. After `shutdown_grace_s` the engine ends every generation still queued or running with an
error, so a stream sends its error chunk and `[DONE]` and a plain request gets its 503, instead of a cut
connection; a second later the other event streams (fine-tuning job events) are ended; uvicorn allows
`SHUTDOWN_FLUSH_S` in all for those answers to go out, then cancels what is left. sse-starlette's own reaction to
the signal (ending every stream at once) is switched off: it would cut the streams the grace period is for. The
app's lifespan shutdown then hands the in-process training job back as `queued` and stops the engine. A
graceful stop exits 0 (uvicorn re-raises the signal it caught once it is done; the handler installed here turns
that SIGTERM into a normal exit).
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI
from sse_starlette.sse import AppStatus

from app.config import Settings

log = logging.getLogger(__name__)

# After the grace period, the time the engine's error events need to reach their clients (one step plus a send).
SHUTDOWN_FLUSH_S = 5.0
# After the engine's error events, when the event streams still open (job events) are told to end.
STREAMS_END_AFTER_S = 1.0
SHUTDOWN_MESSAGE = "the server is shutting down; retry on another replica or shortly"


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose shutdown fails the engine's remaining generations once the grace period is over."""

    def __init__(self, config: uvicorn.Config, *, app: FastAPI, grace_s: float) -> None:
        super().__init__(config)
        self.fastapi_app = app
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        log.info("shutting down: in-flight requests have %.0f s to finish", self.grace_s)
        loop = asyncio.get_running_loop()
        timers = [loop.call_later(self.grace_s, self._fail_generations),
                  loop.call_later(self.grace_s + STREAMS_END_AFTER_S, _end_event_streams)]
        try:
            await super().shutdown(sockets)
        finally:
            for timer in timers:
                timer.cancel()

    def _fail_generations(self) -> None:
        runtime = getattr(self.fastapi_app.state, "runtime", None)
        engine = getattr(runtime, "engine", None)
        if engine is not None:
            log.warning("shutdown grace period over: ending the generations still in flight")
            engine.fail_all_requests(SHUTDOWN_MESSAGE)


def _end_event_streams() -> None:
    AppStatus.should_exit = True  # sse-starlette ends every EventSourceResponse still open


def _exit_cleanly(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(app: FastAPI, settings: Settings) -> None:
    """Run `app` until SIGTERM/SIGINT, then shut down within `settings.shutdown_grace_s` + SHUTDOWN_FLUSH_S."""
    # uvicorn restores this handler and re-raises the SIGTERM it handled: a graceful stop is a success (exit 0).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    AppStatus.disable_automatic_graceful_drain()  # type: ignore[no-untyped-call]  # untyped in sse-starlette
    # access_log=False: the app writes its own access line (request id, tenant, tokens; app.observability).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s + SHUTDOWN_FLUSH_S))
    GracefulServer(config, app=app, grace_s=settings.shutdown_grace_s).run()
