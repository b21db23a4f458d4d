"""Priorities in the running engine: an interactive request takes a batch row's place at the very next step, and
the preempted batch request still delivers exactly the tokens it gives alone (it restarts; nothing of its first
run reaches its consumer)."""

from __future__ import annotations

import asyncio

from app.engine.sampling import SamplingParams
from app.engine.types import GenerationRequest
from tests.engine.helpers import StepProbe, collect, make_engine, until

BATCH_TOKENS = 24


def _batch(rid: str, seed: int) -> GenerationRequest:
    # Seeded sampling: a restarted row must draw the same numbers again from its reseeded generator.
    params = SamplingParams(max_tokens=BATCH_TOKENS, temperature=0.9, seed=seed, ignore_eos=True)
    return GenerationRequest([5, 6, 7], params, request_id=rid, priority="batch")


async def test_an_interactive_request_preempts_a_batch_row_and_the_batch_request_restarts_unchanged(
        tiny_llama) -> None:
    engine = make_engine(tiny_llama, max_batch_rows=2)
    probe = StepProbe(engine)
    probe.hold(min_rows=2)  # the two batch rows may be prefilled a step apart: hold once both decode
    try:
        batch_tasks = [asyncio.create_task(collect(engine, _batch(f"b{i}", seed=i))) for i in (1, 2)]
        await until(lambda: probe.decoding.is_set() and len(probe.decodes[-1]) == 2, "both batch rows decoding")
        short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        interactive = asyncio.create_task(collect(engine, GenerationRequest([9, 8], short, request_id="i")))
        await until(lambda: engine.stats.waiting == 1, "the interactive request queued")
        held_step = len(probe.decodes)  # the decode step in progress (held) is the last one recorded
        probe.release()
        assert len((await interactive).tokens) == 3
        # The very next decode step already has it, next to the one batch row that kept its place.
        first = probe.decodes[held_step]
        assert "i" in first and len(first) == 2
        assert engine.stats.preempted == 1
        results = await asyncio.gather(*batch_tasks)
        # Each consumer saw one complete run: as many tokens as asked, no leftovers of the abandoned run...
        assert [len(r.tokens) for r in results] == [BATCH_TOKENS, BATCH_TOKENS]
        # ...and the same tokens as the request served alone (the engine's batch-invariance contract).
        for i, got in zip((1, 2), results, strict=True):
            alone = await collect(engine, GenerationRequest([5, 6, 7], _batch("x", seed=i).sampling))
            assert got.tokens == alone.tokens and got.text == alone.text
    finally:
        probe.release()
        engine.stop()
