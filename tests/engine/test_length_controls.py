"""vLLM's length controls, per row: `ignore_eos` (EOS does not end a row) and `min_tokens` (no EOS, and no stop
string that ends, within a row's first min_tokens tokens), alone and inside mixed batches.

The tiny random models' greedy text has no natural EOS where a test needs one, so the tests make one: the
engine's EOS set is replaced by a token the greedy continuation is known to produce.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from app.engine.loop import Engine
from app.engine.sampling import SamplerState, SamplingParams, SamplingParamsError, select_tokens
from app.engine.types import GenerationRequest
from tests.engine.helpers import Result, collect, make_engine, random_prefix

CPU = torch.device("cpu")
PROMPT = [1, 2, 3]
FREE = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)


async def _free_run(engine, prompt: list[int] = PROMPT) -> Result:
    """The greedy continuation with no EOS at all (the engine's EOS set emptied first)."""
    engine.eos_token_ids = frozenset()
    return await collect(engine, GenerationRequest(prompt, FREE))


def test_min_tokens_is_validated() -> None:
    SamplingParams(max_tokens=4, min_tokens=4)
    for bad in (-1, 5):
        with pytest.raises(SamplingParamsError, match=r"^min_tokens"):
            SamplingParams(max_tokens=4, min_tokens=bad)


def test_min_tokens_masks_eos_for_exactly_n_tokens() -> None:
    """EOS is the likeliest token every step: a row with min_tokens=2 takes the runner-up twice, then EOS. Its
    logprobs are the model's own (EOS still first among the alternatives), and a neighbour without min_tokens
    takes EOS at once."""
    logits = torch.tensor([[0.0, 1.0, 5.0, 3.0, 2.0]]).repeat(2, 1)  # EOS = 2, runner-up = 3
    row = SamplerState.create(SamplingParams(temperature=0.0, min_tokens=2, logprobs=1), CPU, frozenset({2}))
    plain = SamplerState.create(SamplingParams(temperature=0.0), CPU, frozenset({2}))
    steps = [select_tokens(logits, [row, plain]) for _ in range(3)]
    assert [s[0].token_id for s in steps] == [3, 3, 2]
    assert [s[1].token_id for s in steps] == [2, 2, 2]
    want = float(torch.log_softmax(logits[0], dim=-1)[3])
    assert steps[0][0].logprob == pytest.approx(want) and steps[0][0].top_logprobs[0][0] == 2


def test_min_tokens_masks_eos_of_sampled_rows() -> None:
    """A sampled row whose EOS holds almost all the mass never draws it before min_tokens."""
    logits = torch.tensor([[0.0, 0.0, 12.0, 0.0]])
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=3, min_tokens=50)
    state = SamplerState.create(params, CPU, frozenset({2}))
    assert all(select_tokens(logits, [state])[0].token_id != 2 for _ in range(50))
    assert select_tokens(logits, [state])[0].token_id == 2


async def _eos_at(engine: Engine, index: int) -> tuple[Result, int, Result]:
    """The free run; then the engine's EOS is its token at `index`, and the same request is run honouring EOS."""
    free = await _free_run(engine)
    eos = free.tokens[index]
    engine.eos_token_ids = frozenset({eos})
    honoured = await collect(engine, GenerationRequest(PROMPT, dataclasses.replace(FREE, ignore_eos=False)))
    return free, eos, honoured


async def test_ignore_eos_keeps_going_to_max_tokens(tiny_llama) -> None:
    engine = make_engine(tiny_llama)
    try:
        free, eos, stops = await _eos_at(engine, 2)
        assert stops.final is not None and stops.final.finish_reason == "stop"
        assert stops.tokens == free.tokens[: free.tokens.index(eos) + 1]
        kept = await collect(engine, GenerationRequest(PROMPT, FREE))
        assert kept.final is not None and kept.final.finish_reason == "length"
        assert kept.tokens == free.tokens and eos in kept.tokens  # EOS emitted as an ordinary token
    finally:
        engine.stop()


async def test_min_tokens_forbids_eos_before_n(tiny_llama) -> None:
    """EOS = the greedy first token: without min_tokens the row ends at once; with min_tokens=5 its first five
    tokens hold no EOS (the first is the model's second choice), with or without ignore_eos (vLLM masks EOS in
    both cases)."""
    engine = make_engine(tiny_llama)
    try:
        free, eos, plain = await _eos_at(engine, 0)
        assert plain.tokens == [eos] and plain.final is not None and plain.final.finish_reason == "stop"
        for ignore_eos in (False, True):
            params = dataclasses.replace(FREE, ignore_eos=ignore_eos, min_tokens=5)
            got = await collect(engine, GenerationRequest(PROMPT, params))
            assert len(got.tokens) >= 5 and eos not in got.tokens[:5], (ignore_eos, got.tokens)
            assert got.tokens[0] != eos and got.logprobs[0] < free.logprobs[0]  # the runner-up, raw logprobs
            if got.final is not None and got.final.finish_reason == "stop":
                assert got.tokens[-1] == eos and not ignore_eos
    finally:
        engine.stop()


async def test_stop_string_inside_min_tokens_does_not_end(tiny_llama) -> None:
    """A stop string found in the text of the first min_tokens tokens is kept as text (vLLM's rule)."""
    engine = make_engine(tiny_llama)
    try:
        free = await _free_run(engine)
        stop = next(c for c in free.text if c.strip())  # a character the free text has near its start
        first = free.text.index(stop)
        params = SamplingParams(max_tokens=16, temperature=0.0, stop=(stop,))
        stopped = await collect(engine, GenerationRequest(PROMPT, params))
        assert stopped.text == free.text[:first] and stopped.final is not None
        assert stopped.final.finish_reason == "stop"
        full = await collect(engine, GenerationRequest(PROMPT, dataclasses.replace(params, min_tokens=16)))
        assert full.text == free.text and full.final is not None and full.final.finish_reason == "length"
    finally:
        engine.stop()


async def test_same_tokens_alone_and_in_a_mixed_batch(tiny_llama) -> None:
    """Rows with and without ignore_eos / min_tokens, greedy and seeded, share decode steps: each gives exactly
    what it gives alone, and the settings really change some rows' outputs."""
    engine = make_engine(tiny_llama, max_batch_rows=8)
    try:
        free = await _free_run(engine)
        engine.eos_token_ids = frozenset({free.tokens[1]})
        greedy = SamplingParams(max_tokens=12, temperature=0.0, logprobs=0)
        seeded = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=5)
        settings = [
            greedy,
            dataclasses.replace(greedy, ignore_eos=True),
            dataclasses.replace(greedy, min_tokens=6),
            dataclasses.replace(greedy, ignore_eos=True, min_tokens=12),
            seeded,
            dataclasses.replace(seeded, seed=6, ignore_eos=True),
            dataclasses.replace(seeded, seed=7, min_tokens=9),
        ]
        requests = [GenerationRequest(PROMPT if i < 4 else [4 + i, 9],
                                      prefix=random_prefix(tiny_llama, 2 + i, seed=i) if i % 2 else None,
                                      sampling=p)
                    for i, p in enumerate(settings)]
        alone = [await collect(engine, dataclasses.replace(r, request_id=f"a{i}")) for i, r in enumerate(requests)]
        together = await asyncio.gather(*[
            collect(engine, dataclasses.replace(r, request_id=f"b{i}"), delay=0.002 * i)
            for i, r in enumerate(requests)
        ])
        for i, (a, b) in enumerate(zip(alone, together, strict=True)):
            assert a.tokens == b.tokens, f"request {i}"
            assert a.final is not None and b.final is not None
            assert a.final.finish_reason == b.final.finish_reason, f"request {i}"
            assert max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)), default=0.0) <= 1e-3
        assert max(engine.stats.batch_sizes) > 1
        assert len(alone[0].tokens) == free.tokens.index(free.tokens[1]) + 1  # ends on EOS
        assert len(alone[1].tokens) == 12 and len(alone[3].tokens) == 12
        assert len(alone[2].tokens) >= 6 and alone[2].tokens[:2] != alone[0].tokens
    finally:
        engine.stop()
