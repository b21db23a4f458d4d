"""Where submitted requests wait before admission: the thread-safe intake, prefix loads, the ready queue.

The async side `put`s requests; the engine thread `poll`s once per step. A request whose prefix is a loader (a
callable) is resolved on a side thread, so a cold prefix load never stalls the running batch; it becomes ready
when its load finishes, or fails alone when the load raises. Each load runs on a thread of its own that ends
with it (app/threads.py: a long-lived loader thread would keep an OpenMP pool that slows the engine),
at most `resolver_threads` at a time.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from app.engine.rowstate import ActiveRequest
from app.threads import start_in_own_thread
from prefix_store.types import PrefixTensors


class Intake:
    """Requests between `submit` and admission. `put` is thread-safe; everything else is the engine thread's."""

    def __init__(self, *, resolver_threads: int, wake: Callable[[], None]) -> None:
        self._queue: queue.Queue[ActiveRequest] = queue.Queue()
        self._gate = threading.BoundedSemaphore(resolver_threads)
        self._wake = wake
        self.resolving: list[tuple[ActiveRequest, Future[PrefixTensors]]] = []
        self.ready: deque[ActiveRequest] = deque()

    def put(self, active: ActiveRequest) -> None:
        self._queue.put(active)

    def poll(self) -> list[tuple[ActiveRequest, BaseException]]:
        """Move the requests whose prefix load finished to `ready`; return those whose load failed, with the
        error (the caller ends them)."""
        failed: list[tuple[ActiveRequest, BaseException]] = []
        still = []
        for active, fut in self.resolving:
            if active.done:  # cancelled or timed out while its prefix was loading
                fut.cancel()  # a load still waiting for its turn never starts
                continue
            if not fut.done():
                still.append((active, fut))
                continue
            exc = fut.exception()
            if exc is not None:
                failed.append((active, exc))
            else:
                active.prefix = fut.result()
                self.ready.append(active)
        self.resolving = still
        return failed

    def take_new(self) -> list[ActiveRequest]:
        """Submitted requests not seen yet: those with a prefix loader start loading, the others are ready."""
        taken: list[ActiveRequest] = []
        while True:
            try:
                active = self._queue.get_nowait()
            except queue.Empty:
                return taken
            taken.append(active)
            src = active.request.prefix
            if callable(src):
                fut = start_in_own_thread(src, name="prefix-resolve", gate=self._gate)  # may hold a start failure
                fut.add_done_callback(lambda _f: self._wake())
                self.resolving.append((active, fut))
            else:
                active.prefix = src
                self.ready.append(active)

    def drop_done(self) -> None:
        """Forget ready requests that already finished (cancelled, timed out, failed)."""
        self.ready = deque(a for a in self.ready if not a.done)

    def clear(self) -> None:
        """Forget every queued request (the engine failed them all, or stops): loads not started yet are
        cancelled; running ones finish on their own (nobody reads them)."""
        for _, fut in self.resolving:
            fut.cancel()
        self.resolving = []
        self.ready.clear()
