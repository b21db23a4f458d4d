"""The engine's book of requests: every request it holds, by id, and what the async side asks of them.

Two threads meet here. The async side (any event-loop thread) takes a waiting place when it submits, and asks for
a request to be cancelled or for everything to be failed; the engine thread applies those asks at the start of a
step and is the only one that adds, finishes or looks up requests. So only the waiting count and the two asks are
behind the lock, and the lock is held for a few assignments, never across a step.
"""

from __future__ import annotations

import threading

from app.engine.admission import EngineStats
from app.engine.rowstate import ActiveRequest
from app.engine.types import EngineOverloaded, ErrorKind, FinishReason


class RequestBook:
    """Requests queued, loading a prefix or running (`active`, engine thread only) and the waiting count that
    `max_waiting` bounds (mirrored in `stats.waiting` for /metrics)."""

    def __init__(self, *, stats: EngineStats, max_waiting: int) -> None:
        self.active: dict[str, ActiveRequest] = {}
        self._stats = stats
        self._max_waiting = max_waiting
        self._lock = threading.Lock()
        self._waiting = 0
        self._cancelled: set[str] = set()
        self._fail_reason: str | None = None

    # ---- async side ------------------------------------------------------------------------------------------
    def take_place(self) -> None:
        """Count one more waiting request, or raise EngineOverloaded when `max_waiting` are already waiting."""
        with self._lock:
            if self._waiting >= self._max_waiting:
                raise EngineOverloaded(f"{self._waiting} requests are already waiting")
            self._count(+1)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    def fail_all(self, why: str) -> None:
        with self._lock:
            self._fail_reason = why

    # ---- engine thread ---------------------------------------------------------------------------------------
    def take_asks(self) -> tuple[set[str], str | None]:
        """The ids asked to be cancelled and the fail-everything reason (if asked) since the last call."""
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            reason, self._fail_reason = self._fail_reason, None
        return cancelled, reason

    def add(self, active: ActiveRequest) -> None:
        self.active[active.request_id] = active

    def requeued(self, fresh: ActiveRequest) -> None:
        """A preempted row's restarted copy: it replaces the old one under its id and waits again."""
        self.active[fresh.request_id] = fresh
        with self._lock:
            self._count(+1)

    def leave_queue(self, active: ActiveRequest) -> None:
        """A request stops counting against `max_waiting` once it is admitted or finished."""
        if active.queued:
            active.queued = False
            with self._lock:
                self._count(-1)

    def finish(
        self, active: ActiveRequest, reason: FinishReason, error: str | None = None, kind: ErrorKind | None = None
    ) -> None:
        """End a request (its final event goes out) and forget it; a request already done is left alone."""
        if active.done:
            return
        self.leave_queue(active)
        active.finish(reason, error=error, kind=kind)
        self.active.pop(active.request_id, None)

    def late(self, now: float) -> list[ActiveRequest]:
        """The requests whose deadline is past at `now` (time.monotonic())."""
        return [a for a in self.active.values() if a.deadline is not None and now >= a.deadline]

    def _count(self, delta: int) -> None:  # under the lock
        self._waiting += delta
        self._stats.waiting = self._waiting
