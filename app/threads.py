"""Torch work off the engine thread, in threads that do not outlive it.

libgomp (PyTorch's OpenMP on Linux) keeps a pool of worker threads for every thread that ever ran a parallel
region, for as long as that thread lives, and once its pools hold more threads than there are CPUs it stops
spin-waiting between parallel regions. A decode step is hundreds of short parallel regions, so one idle pool left
by the thread that loaded the model made the engine's 32-row decode step of the embedded model ~10% slower on a
2-vCPU machine (91-110 ms vs 81-87 ms, measured). A thread that exits frees its pool: model loading and prefix
loads run in short-lived threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def run_in_own_thread(fn: Callable[[], T], *, name: str = "torch-setup") -> T:
    """Run `fn` on a new thread and wait for it; returns its result or raises its exception."""
    fut = start_in_own_thread(fn, name=name)
    return fut.result()


def start_in_own_thread(
    fn: Callable[[], T], *, name: str, gate: threading.BoundedSemaphore | None = None
) -> Future[T]:
    """Start `fn` on a new daemon thread (after taking `gate`, when given); its outcome arrives in the future,
    including a thread that cannot be started (the future then holds that RuntimeError)."""
    fut: Future[T] = Future()

    def run() -> None:
        if gate is not None:
            gate.acquire()
        try:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # handed to whoever waits on the future
                    fut.set_exception(exc)
        finally:
            if gate is not None:
                gate.release()

    try:
        threading.Thread(target=run, name=name, daemon=True).start()
    except RuntimeError as exc:  # "can't start new thread": the caller's future fails like the call would
        fut.set_exception(exc)
    return fut
