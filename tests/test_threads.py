"""Short-lived threads for torch work off the engine thread (app/threads.py)."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch

from app.threads import run_in_own_thread, start_in_own_thread


def test_result_and_exception_come_back() -> None:
    assert run_in_own_thread(lambda: threading.current_thread().name, name="x-1") == "x-1"

    def boom() -> None:
        raise ValueError("bad prefix")

    with pytest.raises(ValueError, match="bad prefix"):
        run_in_own_thread(boom)


def test_a_thread_that_cannot_start_fails_the_future(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def no_threads(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_threads)
    fut = start_in_own_thread(lambda: 1, name="w")
    with pytest.raises(RuntimeError, match="can't start"):
        fut.result(timeout=1)


def test_gate_bounds_concurrency() -> None:
    gate = threading.BoundedSemaphore(2)
    running, peak, lock = 0, 0, threading.Lock()
    pair = threading.Barrier(2, timeout=30)  # two run at once: each waits for the other

    def work() -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        pair.wait()
        with lock:
            running -= 1
        return 1

    futures = [start_in_own_thread(work, name="w", gate=gate) for _ in range(6)]
    assert sum(f.result(timeout=10) for f in futures) == 6
    assert peak == 2


def test_a_cancelled_start_never_runs() -> None:
    gate = threading.BoundedSemaphore(1)
    gate.acquire()  # hold the only slot: the thread waits on it
    ran = threading.Event()
    fut = start_in_own_thread(ran.set, name="w", gate=gate)
    assert fut.cancel()
    gate.release()
    for thread in threading.enumerate():  # the started thread takes the slot, sees the cancel, and ends
        if thread.name == "w":
            thread.join(30)
    assert not ran.is_set()


@pytest.mark.skipif(sys.platform != "linux", reason="counts threads through /proc")
def test_no_openmp_pool_outlives_the_thread() -> None:
    """Parallel torch ops on a thread start OpenMP workers; they go away with the thread."""
    before = len(os.listdir("/proc/self/task"))
    run_in_own_thread(lambda: (torch.randn(30, 3, 256, 64) * 2).sum())
    deadline = time.monotonic() + 30  # the workers exit just after the thread: wait for that, generously
    while len(os.listdir("/proc/self/task")) > before:
        assert time.monotonic() < deadline, "OpenMP workers outlived their thread"
        time.sleep(0.01)
