"""The batch-invariance contract (docs/batching.md): a request gives the same greedy tokens (and logits within
1e-3) alone and in any batch.

Checked three ways: against a reference that recomputes the whole sequence every step with no batching at all,
through the Batch verbs directly (logits compared), and through the running engine with rows joining mid-flight.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from transformers.cache_utils import DynamicCache

from app.engine.batch import Batch, NewRow
from app.engine.runner import ModelRunner, cache_kwarg_name, geometry_of
from app.engine.sampling import SamplerState, SamplingParams, select_tokens
from app.engine.types import GenerationRequest
from tests.engine.helpers import collect, make_engine, random_prefix

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)


def reference_greedy(loaded, prompt: list[int], prefix, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding that recomputes everything each step: one row, no padding, no incremental cache."""
    model = loaded.model
    p = prefix.num_virtual_tokens if prefix is not None else 0
    ids = list(prompt)
    tokens, logits_seq = [], []
    for _ in range(steps):
        cache = DynamicCache()
        if prefix is not None:
            for layer in range(prefix.num_layers):
                cache.update(prefix.keys[layer][None].clone(), prefix.values[layer][None].clone(), layer)
        with torch.inference_mode():
            out = model(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, p + len(ids), dtype=torch.long),
                position_ids=torch.arange(p, p + len(ids))[None],
                use_cache=True,
                **{cache_kwarg_name(model): cache},
            )
        last = out.logits[0, -1].float()
        tok = int(last.argmax())
        tokens.append(tok)
        logits_seq.append(last)
        ids.append(tok)
    return tokens, logits_seq


def _rows(loaded):
    """Prompts of different lengths, prefixes of different lengths, one row without a prefix."""
    return [
        ([5, 6, 7, 8, 9, 10, 11], random_prefix(loaded, 3, seed=1)),
        ([12, 13], None),
        ([14, 15, 16], random_prefix(loaded, 11, seed=2)),
        ([17] * 9, random_prefix(loaded, 1, seed=3)),
    ]


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def tiny(request):
    return request.getfixturevalue(request.param)


def test_batch_matches_unbatched_reference_with_joins_and_leaves(tiny) -> None:
    g = geometry_of(tiny.model, tiny.device, tiny.dtype)
    runner = ModelRunner(tiny.model)
    rows = _rows(tiny)
    steps = 6
    refs = [reference_greedy(tiny, prompt, prefix, steps + 2) for prompt, prefix in rows]

    def new(i: int) -> NewRow:
        return NewRow(str(i), rows[i][0], rows[i][1], SamplerState.create(GREEDY, g.device))

    got: dict[str, list[tuple[int, torch.Tensor]]] = {str(i): [] for i in range(len(rows))}

    def step(batch: Batch) -> None:
        logits = runner.forward(batch)
        choices = select_tokens(logits, [r.sampler for r in batch.rows])
        for row, c, lg in zip(batch.rows, choices, logits, strict=True):
            got[row.request_id].append((c.token_id, lg.float()))
        batch.advance([c.token_id for c in choices])

    # rows 0 and 1 start together; 2 and 3 join after two steps; row 1 leaves after four.
    batch = Batch.from_requests([new(0), new(1)], geometry=g, pad_token_id=0)
    step(batch)
    step(batch)
    joining = Batch.from_requests([new(2), new(3)], geometry=g, pad_token_id=0)
    step(joining)
    batch = Batch.concatenate([batch, joining])
    for _ in range(2):
        step(batch)
    filtered = batch.filter({"0", "2", "3"})
    assert filtered is not None
    batch = filtered
    for _ in range(3):
        step(batch)

    for i, (ref_tokens, ref_logits) in enumerate(refs):
        seq = got[str(i)]
        assert [t for t, _ in seq] == ref_tokens[: len(seq)], f"row {i} diverged"
        worst = max(float((lg - ref).abs().max()) for (_, lg), ref in zip(seq, ref_logits, strict=False))
        assert worst <= 1e-3, f"row {i}: logits differ by {worst}"


async def test_engine_same_tokens_alone_and_in_batch(tiny) -> None:
    engine = make_engine(tiny, max_batch_rows=8)
    try:
        rows = [*_rows(tiny), ([3, 4, 5], random_prefix(tiny, 20, seed=9)), ([40, 41], None)]
        requests = [
            GenerationRequest(
                prompt_ids=p, prefix=x, sampling=dataclasses.replace(GREEDY, max_tokens=16 + 2 * i)
            )
            for i, (p, x) in enumerate(rows)
        ]
        alone = [
            await collect(engine, dataclasses.replace(r, request_id=f"a{i}")) for i, r in enumerate(requests)
        ]
        together = await asyncio.gather(
            *[
                # staggered by less than a request lasts (~1 ms a step), so later ones join mid-flight
                collect(engine, dataclasses.replace(r, request_id=f"b{i}"), delay=0.002 * i)
                for i, r in enumerate(requests)
            ]
        )
        for i, (a, b) in enumerate(zip(alone, together, strict=True)):
            assert a.tokens == b.tokens, f"request {i}"
            assert len(a.tokens) == requests[i].sampling.max_tokens
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= 1e-3
            assert b.final is not None and b.final.finish_reason == "length"
        # the staggered requests really shared decode steps
        assert max(engine.stats.batch_sizes) > 1
    finally:
        engine.stop()


async def test_seeded_sampling_same_alone_and_in_batch(tiny) -> None:
    engine = make_engine(tiny)
    try:
        params = SamplingParams(
            max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True
        )
        prefix = random_prefix(tiny, 5, seed=4)
        alone = await collect(engine, GenerationRequest(prompt_ids=[7, 8, 9], prefix=prefix, sampling=params))
        others = [
            GenerationRequest(
                prompt_ids=[i + 1, i + 2],
                prefix=random_prefix(tiny, 2 + i, seed=i),
                sampling=dataclasses.replace(params, seed=i),
            )
            for i in range(4)
        ]
        results = await asyncio.gather(
            *[collect(engine, r) for r in others],
            collect(
                engine, GenerationRequest(prompt_ids=[7, 8, 9], prefix=prefix, sampling=params), delay=0.01
            ),
        )
        assert results[-1].tokens == alone.tokens
        # a different seed gives a different sample (12 tokens over the vocab: a collision is ~impossible)
        other_seed = await collect(
            engine,
            GenerationRequest(
                prompt_ids=[7, 8, 9], prefix=prefix, sampling=dataclasses.replace(params, seed=99)
            ),
        )
        assert other_seed.tokens != alone.tokens
    finally:
        engine.stop()


def test_prefix_tensors_are_copied_not_aliased(tiny_llama) -> None:
    g = geometry_of(tiny_llama.model, tiny_llama.device, tiny_llama.dtype)
    prefix = random_prefix(tiny_llama, 4, seed=5)
    before = prefix.keys.clone()
    batch = Batch.from_requests(
        [NewRow("x", [1, 2, 3], prefix, SamplerState.create(GREEDY, g.device))], geometry=g, pad_token_id=0
    )
    ModelRunner(tiny_llama.model).forward(batch)
    batch.cache.slabs[0].keys.zero_()  # type: ignore[union-attr]
    assert torch.equal(prefix.keys, before)


@pytest.mark.slow
async def test_embedded_model_batch_invariance(embedded_model) -> None:
    tok = embedded_model.tokenizer
    engine = make_engine(embedded_model)
    try:
        prompts = ["The capital of France is", "Write a haiku about rain.", "1, 2, 3, 4,", "Hello"]
        requests = [
            GenerationRequest(
                prompt_ids=tok.encode(p),
                sampling=dataclasses.replace(GREEDY, max_tokens=10),
                prefix=None if i == 3 else random_prefix(embedded_model, 4 + 5 * i, seed=i, scale=0.5),
            )
            for i, p in enumerate(prompts)
        ]
        alone = [
            await collect(engine, dataclasses.replace(r, request_id=f"a{i}")) for i, r in enumerate(requests)
        ]
        together = await asyncio.gather(
            *[
                collect(engine, dataclasses.replace(r, request_id=f"b{i}"), delay=0.05 * i)
                for i, r in enumerate(requests)
            ]
        )
        for a, b in zip(alone, together, strict=True):
            assert a.tokens == b.tokens
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= 1e-3
        # a prefix changes what the model says (it is really attended to)
        assert (
            alone[0].tokens
            != (await collect(engine, dataclasses.replace(requests[0], prefix=None, request_id="np"))).tokens
        )
    finally:
        engine.stop()
