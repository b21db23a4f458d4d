"""Backpressure at the engine on the tiny Llama: a consumer that stops reading gets its request cancelled once
its bounded event queue is full (the row leaves the batch long before max_tokens), and a request past the
request timeout ends with an error of kind "timeout" wherever it is (running or still queued)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from app.engine.sampling import SamplingParams
from app.engine.types import GenerationRequest
from tests.engine.helpers import collect, make_engine

MANY = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)


async def _wait_until_gone(engine, request_id: str, timeout: float = 20.0) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while request_id in engine._active:
        assert time.monotonic() - t0 < timeout, "the engine still runs the request"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def test_stalled_consumer_is_cancelled_with_bounded_buffer(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(tiny_llama, max_buffered_events=16)
    try:
        stream = engine.submit(GenerationRequest([1, 2, 3], MANY, request_id="stalled"))
        first = await stream.__anext__()  # the consumer reads one event, then stops reading
        assert first.token_id is not None
        await _wait_until_gone(engine, "stalled")
        generated = engine.stats.generated_tokens
        assert generated < 100, f"the row kept generating for a consumer that stopped reading ({generated})"
        await asyncio.sleep(0.1)
        assert engine.stats.generated_tokens == generated and engine.stats.running_rows == 0
        # When the consumer comes back it gets what was buffered (at most the bound), then a final event.
        rest = [ev async for ev in stream]
        assert len(rest) <= 16 + 1
        final = rest[-1]
        assert final.final and final.finish_reason == "cancelled" and "stopped reading" in (final.error or "")
        # Other requests are unaffected.
        res = await collect(engine, GenerationRequest([4, 5], SamplingParams(max_tokens=30, ignore_eos=True)))
        assert len(res.tokens) == 30 and res.final is not None and res.final.finish_reason == "length"
    finally:
        engine.stop()


async def test_a_reading_consumer_is_never_cut_off(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    """The bound is on events waiting, not on the request's length: a consumer that keeps up gets them all.

    Each step is slowed to 5 ms: the tiny model's steps take well under a millisecond, and on a loaded 2-core
    machine the asyncio thread could then fall 8 events behind without being a slow reader (seen as a flake)."""
    engine = make_engine(tiny_llama, max_buffered_events=8)
    forward = engine.runner.forward

    def slow(batch, _forward=forward):  # type: ignore[no-untyped-def]
        time.sleep(0.005)
        return _forward(batch)

    engine.runner.forward = slow  # type: ignore[method-assign]
    try:
        res = await collect(engine, GenerationRequest([1, 2], SamplingParams(max_tokens=120, ignore_eos=True)))
        assert len(res.tokens) == 120 and res.final is not None and res.final.finish_reason == "length"
    finally:
        engine.stop()


async def test_request_timeout_ends_a_running_request(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(tiny_llama, request_timeout_s=0.5)
    try:
        t0 = time.monotonic()
        res = await collect(engine, GenerationRequest([1, 2, 3], MANY, request_id="slow"))
        elapsed = time.monotonic() - t0
        assert res.final is not None and res.final.finish_reason == "error" and res.final.error_kind == "timeout"
        assert "timed out after 0.5 s" in (res.final.error or "")
        assert res.tokens and len(res.tokens) < 2000 and 0.5 <= elapsed < 3.0
        assert engine._active == {} and engine.stats.running_rows == 0
    finally:
        engine.stop()


async def test_request_timeout_ends_a_queued_request(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    """One batch row, held by a request without a deadline: the next one times out while still waiting."""
    engine = make_engine(tiny_llama, max_batch_rows=1)
    try:
        hog = asyncio.create_task(collect(engine, GenerationRequest([1, 2, 3], MANY, request_id="hog")))
        await asyncio.sleep(0.1)
        engine.limits = dataclasses.replace(engine.limits, request_timeout_s=0.3)
        res = await collect(engine, GenerationRequest([4, 5], MANY, request_id="queued"))
        assert res.final is not None and res.final.error_kind == "timeout" and res.tokens == []
        assert engine.stats.waiting == 0 and "hog" in engine._active  # the running one goes on
        hog.cancel()
        await _wait_until_gone(engine, "hog")
    finally:
        engine.stop()
