"""Database work for the request path: off the event loop, on a bounded set of threads, never waiting long.

A request's queries run in one short session on one of `threads` threads; the session (and its connection)
is closed before the call returns, so nothing is held while the request generates or streams. A request that
cannot get a thread within `wait_s`, or whose thread cannot get a pooled connection within the pool's timeout,
is a 503 with `Retry-After`: a burst larger than the database can take is shed, not queued for half a minute.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.errors import database_busy

log = logging.getLogger(__name__)

T = TypeVar("T")


class DbCalls:
    """Runs `fn(session)` for the request path. `threads` should not exceed the pool's connections: then a
    thread that got its turn also gets a connection at once."""

    def __init__(self, sessions: sessionmaker[Session], *, threads: int, wait_s: float) -> None:
        self._sessions = sessions
        self._wait_s = wait_s
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None  # threads start on first use, not at import
        self._turns: asyncio.Semaphore | None = None  # made on the serving event loop

    async def run(self, fn: Callable[[Session], T]) -> T:
        """`fn` in a fresh session on a worker thread; 503 `database_busy` when none frees up in time."""
        if self._turns is None or self._executor is None:
            self._turns = asyncio.Semaphore(self._threads)
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="db")
        try:
            await asyncio.wait_for(self._turns.acquire(), self._wait_s)
        except TimeoutError:
            raise database_busy() from None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)
        finally:
            self._turns.release()

    def _call(self, fn: Callable[[Session], T]) -> T:
        try:
            with self._sessions() as session:
                return fn(session)
        except sa.exc.TimeoutError:  # the pool had no connection free within its timeout
            raise database_busy() from None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
