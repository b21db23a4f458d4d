"""Helpers for engine tests: build an engine on a loaded model, random prefixes, run requests to the end."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from app.engine.factory import build_engine
from app.engine.loop import Engine
from app.engine.types import GenerationRequest, TokenEvent
from prefix_store.types import PrefixKV


def make_engine(loaded, **limits: float | bool) -> Engine:
    """A started engine on `loaded` (the production factory), with limits overridden for the test."""
    eng = build_engine(loaded, **limits)
    eng.start()
    return eng


def random_prefix(loaded, num_virtual_tokens: int, seed: int, scale: float = 1.0) -> PrefixKV:
    """A prefix of the model's shape with N(0, scale^2) keys/values: [L, H_kv, P, D]."""
    s = loaded.spec
    gen = torch.Generator().manual_seed(seed)
    shape = (s.num_layers, s.num_kv_heads, num_virtual_tokens, s.head_dim)
    return PrefixKV(
        keys=torch.randn(shape, generator=gen) * scale,
        values=torch.randn(shape, generator=gen) * scale,
        base_fingerprint=s.fingerprint,
    )


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    final: TokenEvent | None = None


async def collect(engine: Engine, request: GenerationRequest, delay: float = 0.0) -> Result:
    """Submit after `delay` seconds and gather every event of the request."""
    await asyncio.sleep(delay)
    out = Result()
    async for ev in engine.submit(request):
        if ev.token_id is not None:
            out.tokens.append(ev.token_id)
            if ev.logprob is not None:
                out.logprobs.append(ev.logprob)
        out.text += ev.text
        if ev.final:
            out.final = ev
    return out


async def until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for `predicate` to hold. The deadline only turns a condition that never comes into a failure instead
    of a hang; it is never the thing under test, so it is generous."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.005)


class StepProbe:
    """Wraps the engine's model forward to make scheduling tests independent of the machine's speed.

    Records every prefill (the request ids it prefills, and those running at that moment) and every decode step
    (its request ids), so a test asserts what the scheduler did, step by step, instead of inferring it from how
    long things took. `hold()` makes decode steps wait (on the engine thread) until `release()`: a running
    request then surely stays running while the test submits others, however fast the machine decodes.
    `lockstep_with(loop)` makes each step first wait until `loop` has handled the events posted by the steps
    before it, so a consumer on that loop keeps pace whatever the thread scheduling of a loaded machine.
    """

    def __init__(self, engine, *, step_delay_s: float = 0.0) -> None:  # type: ignore[no-untyped-def]
        self.engine = engine
        self.step_delay_s = step_delay_s
        self.prefills: list[tuple[frozenset[str], frozenset[str]]] = []
        self.decodes: list[frozenset[str]] = []
        self.decoding = threading.Event()  # a decode step has started
        self._open = threading.Event()
        self._open.set()
        self._hold_rows = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._forward = engine.runner.forward
        engine.runner.forward = self._wrapped

    def hold(self, min_rows: int = 1) -> None:
        """Make decode steps of at least `min_rows` rows wait for `release()` (smaller ones run on: requests that
        reach the batch a step apart on a loaded machine can still all join it before it is held)."""
        self._hold_rows = min_rows
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def lockstep_with(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def _wrapped(self, batch):  # type: ignore[no-untyped-def]
        running = self.engine._running
        if self._loop is not None and not self._loop.is_closed():
            handled = threading.Event()
            # call_soon_threadsafe runs callbacks in order: this one runs after the earlier steps' deliveries.
            self._loop.call_soon_threadsafe(handled.set)
            handled.wait(60)
        ids = frozenset(r.request_id for r in batch.rows)
        if batch is running:
            self.decodes.append(ids)
            self.decoding.set()
            if len(ids) >= self._hold_rows:
                self._open.wait(60)  # bounded: a failing test must not leave the engine thread stuck for good
        else:
            self.prefills.append((ids, frozenset(r.request_id for r in running.rows) if running else frozenset()))
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        return self._forward(batch)
