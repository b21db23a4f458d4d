"""Backpressure at the engine on the tiny Llama: a consumer that stops reading gets its request cancelled once
its bounded event queue is full (the row leaves the batch long before max_tokens), and a request past the
request timeout ends with an error of kind "timeout" wherever it is (running or still queued)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from app.engine.sampling import SamplingParams
from app.engine.types import GenerationRequest
from tests.engine.helpers import StepProbe, collect, make_engine, until

MANY = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)


async def _wait_until_gone(engine, request_id: str) -> None:  # type: ignore[no-untyped-def]
    await until(lambda: request_id not in engine.requests.active, f"request {request_id} leaving the engine")


async def test_stalled_consumer_is_cancelled_with_bounded_buffer(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(tiny_llama, max_buffered_events=16)
    # Each step waits until the event loop has taken the previous steps' events: how many tokens the engine
    # makes before it sees the overflow then depends on the bound only, not on how the threads were scheduled.
    StepProbe(engine).lockstep_with(asyncio.get_running_loop())
    try:
        stream = engine.submit(GenerationRequest([1, 2, 3], MANY, request_id="stalled"))
        first = await stream.__anext__()  # the consumer reads one event, then stops reading
        assert first.token_id is not None
        await _wait_until_gone(engine, "stalled")
        generated = engine.stats.generated_tokens
        # 1 read + 16 buffered + the one that overflowed + at most the step already under way when it did
        assert generated <= 1 + 16 + 2, f"the row kept generating for a consumer that stopped reading ({generated})"
        assert engine.stats.running_rows == 0
        # When the consumer comes back it gets what was buffered (at most the bound), then a final event.
        rest = [ev async for ev in stream]
        assert len(rest) <= 16 + 1
        final = rest[-1]
        assert final.final and final.finish_reason == "cancelled" and "stopped reading" in (final.error or "")
        # Other requests are unaffected.
        res = await collect(engine, GenerationRequest([4, 5], SamplingParams(max_tokens=30, ignore_eos=True)))
        assert len(res.tokens) == 30 and res.final is not None and res.final.finish_reason == "length"
        assert engine.stats.generated_tokens == generated + 30  # nothing more was made for the stalled one
    finally:
        engine.stop()


async def test_a_reading_consumer_is_never_cut_off(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    """The bound is on events waiting, not on the request's length: a consumer that keeps up gets them all.

    Each step waits until the event loop has taken the previous steps' events: the tiny model's steps take well
    under a millisecond, and on a loaded 2-core machine the asyncio thread could otherwise fall 8 events behind
    without being a slow reader (a slowed step only made that less likely)."""
    engine = make_engine(tiny_llama, max_buffered_events=8)
    StepProbe(engine).lockstep_with(asyncio.get_running_loop())
    try:
        res = await collect(engine, GenerationRequest([1, 2], SamplingParams(max_tokens=120, ignore_eos=True)))
        assert len(res.tokens) == 120 and res.final is not None and res.final.finish_reason == "length"
    finally:
        engine.stop()


async def test_request_timeout_ends_a_running_request(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    """The deadline passes while the request decodes. A short real timeout would race the first prefill on a
    loaded machine (and a fast one could finish the request first): the timeout is generous, decoding is held
    after the first step, and the test moves the request's deadline to now, as if the timeout had run out."""
    engine = make_engine(tiny_llama, request_timeout_s=30)
    probe = StepProbe(engine)
    probe.hold()
    try:
        task = asyncio.create_task(collect(engine, GenerationRequest([1, 2, 3], MANY, request_id="slow")))
        await until(probe.decoding.is_set, "the request decoding")
        engine.requests.active["slow"].deadline = time.monotonic()
        probe.release()
        res = await task
        assert res.final is not None and res.final.finish_reason == "error" and res.final.error_kind == "timeout"
        assert "timed out after 30 s" in (res.final.error or "")
        assert res.tokens and len(res.tokens) < 2000 and len(probe.decodes) < 2000
        assert engine.requests.active == {} and engine.stats.running_rows == 0
    finally:
        engine.stop()


async def test_request_timeout_ends_a_queued_request(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    """One batch row, held by a request without a deadline: the next one times out while still waiting."""
    engine = make_engine(tiny_llama, max_batch_rows=1)
    # 5 ms a step: the hog's 2000 tokens then take at least 10 s whatever the machine, so it surely still holds
    # the row when the other request's 0.3 s run out (unslowed, a fast machine could finish it first).
    probe = StepProbe(engine, step_delay_s=0.005)
    try:
        hog = asyncio.create_task(collect(engine, GenerationRequest([1, 2, 3], MANY, request_id="hog")))
        await until(probe.decoding.is_set, "the hog decoding")
        engine.limits = dataclasses.replace(engine.limits, request_timeout_s=0.3)
        res = await collect(engine, GenerationRequest([4, 5], MANY, request_id="queued"))
        assert res.final is not None and res.final.error_kind == "timeout" and res.tokens == []
        assert engine.stats.waiting == 0 and "hog" in engine.requests.active  # the running one goes on
        hog.cancel()
        await _wait_until_gone(engine, "hog")
    finally:
        engine.stop()
