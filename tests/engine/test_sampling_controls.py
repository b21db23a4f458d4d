"""vLLM's logits controls (logit_bias, repetition / frequency / presence penalties, min_p) and stop_token_ids:
each against a dense, one-row-at-a-time reference written from vLLM's definitions, and each batch-invariant (a row
gets the same tokens alone and next to any neighbours, greedy and seeded), on random logits and through the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

import pytest
import torch
from transformers.cache_utils import DynamicCache

from app.engine.runner import cache_kwarg_name
from app.engine.sampling import SamplerState, SamplingParams, SamplingParamsError, _filtered_logits, select_tokens
from app.engine.types import GenerationRequest
from tests.engine.helpers import collect, make_engine

CPU = torch.device("cpu")


def reference_controls(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """vLLM's definitions for one row, token by token: logits [V] -> what the row chooses from [V]."""
    x = logits.clone().float()
    for t, b in p.logit_bias:
        x[t] += b
    seen = set(prompt) | set(output) if p.repetition_penalty != 1.0 else set()
    for t in seen:
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(output).items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


def _steps(b: int, v: int, n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, v, generator=gen) * 2 for _ in range(n)]


PROMPT = [3, 7, 7, 11]
CONTROLLED = [
    SamplingParams(temperature=0.0, repetition_penalty=1.8),
    SamplingParams(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5, logprobs=2),
    SamplingParams(temperature=0.0, presence_penalty=-2.0, repetition_penalty=0.5),
    SamplingParams(temperature=0.0, logit_bias=((5, 4.0), (9, -100.0), (12, 2.5))),
    SamplingParams(temperature=0.0, logit_bias=((1, 1.0),), frequency_penalty=2.0, repetition_penalty=1.3),
]


def test_greedy_controls_match_the_reference_step_by_step() -> None:
    """Rows with penalties and biases, batched with a plain row, over steps that feed their tokens back: each row
    takes the argmax of the reference, and its logprobs stay the model's own."""
    params = [*CONTROLLED, SamplingParams(temperature=0.0)]
    states = [SamplerState.create(p, CPU, prompt_ids=PROMPT) for p in params]
    outputs: list[list[int]] = [[] for _ in params]
    changed = set()
    for logits in _steps(len(params), 40, 12, seed=1):
        choices = select_tokens(logits, states)
        for i, (p, c) in enumerate(zip(params, choices, strict=True)):
            want = reference_controls(logits[i], p, PROMPT, outputs[i])
            assert c.token_id == int(want.argmax()), f"row {i}"
            changed |= {i} if c.token_id != int(logits[i].argmax()) else set()
            if p.logprobs is not None:
                assert c.logprob == pytest.approx(float(torch.log_softmax(logits[i], -1)[c.token_id]))
            outputs[i].append(c.token_id)
    assert changed == set(range(len(CONTROLLED))), changed  # every control changed some choice; the plain row none
    assert 9 not in outputs[3] and outputs[3].count(5) > 0


def test_repetition_penalty_reaches_prompt_tokens_only_when_on() -> None:
    """The prompt's tokens are penalized by repetition_penalty, never by frequency/presence (output counts)."""
    logits = torch.zeros(1, 12)
    logits[0, 7] = 2.0  # a prompt token, the likeliest
    logits[0, 4] = 1.5
    rep = SamplerState.create(SamplingParams(temperature=0.0, repetition_penalty=2.0), CPU, prompt_ids=PROMPT)
    freq = SamplerState.create(SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0), CPU,
                               prompt_ids=PROMPT)
    assert select_tokens(logits, [rep])[0].token_id == 4  # 2.0 / 2 < 1.5
    assert select_tokens(logits, [freq])[0].token_id == 7  # not generated yet: no penalty
    assert select_tokens(logits, [freq])[0].token_id == 4  # generated once: 2.0 - 2 - 2 < 1.5


@pytest.mark.parametrize("min_ps", [[0.0, 0.01, 0.1, 0.5, 1.0], [0.02, 0.01, 0.1, 0.5, 1.0]])  # some rows / all
def test_min_p_keeps_what_the_probability_definition_keeps(min_ps: list[float]) -> None:
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(4)) * 3
    temperature = 0.7
    x = _filtered_logits(logits, [SamplingParams(temperature=temperature, min_p=m) for m in min_ps])
    for i, m in enumerate(min_ps):
        probs = torch.softmax(logits[i] / temperature, dim=-1)
        want = probs >= m * probs.max()
        assert torch.equal(torch.isfinite(x[i]), want), f"row {i}, min_p {m}"
    assert int(torch.isfinite(x[4]).sum()) == 1 and int(torch.isfinite(x[1]).sum()) > int(torch.isfinite(x[3]).sum())


def test_sampled_rows_with_controls_are_the_same_alone_and_batched() -> None:
    """Seeded sampled rows with min_p, penalties and biases next to greedy and plain rows: each draws exactly what it
    draws alone, step after step (the controls' state is the row's own)."""
    params = [
        SamplingParams(temperature=1.0, seed=1, min_p=0.05),
        SamplingParams(temperature=0.8, seed=2, top_k=20, frequency_penalty=1.0, presence_penalty=0.3, logprobs=1),
        SamplingParams(temperature=1.2, seed=3, top_p=0.9, repetition_penalty=1.5, logit_bias=((0, 5.0),)),
        SamplingParams(temperature=0.0, repetition_penalty=1.2, logprobs=0),
        SamplingParams(temperature=1.0, seed=5),
        SamplingParams(temperature=1.0, seed=6, min_p=0.2, logit_bias=((3, -100.0), (2, 100.0)), min_tokens=4),
    ]
    steps = _steps(len(params), 200, 10, seed=7)
    batch = [SamplerState.create(p, CPU, frozenset({2}), prompt_ids=[i, 2 * i]) for i, p in enumerate(params)]
    together = [select_tokens(lg, batch) for lg in steps]
    for i, p in enumerate(params):
        alone_state = SamplerState.create(p, CPU, frozenset({2}), prompt_ids=[i, 2 * i])
        alone = [select_tokens(lg[i : i + 1], [alone_state])[0] for lg in steps]
        assert [t[i] for t in together] == alone, f"row {i}"
    row5 = [t[5].token_id for t in together]
    assert 2 not in row5[:4] and row5[4] == 2 and 3 not in row5  # min_tokens masks the end token despite +100


def test_stop_token_ids_are_masked_by_min_tokens() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 3.0, 2.0]])  # token 2 the likeliest
    state = SamplerState.create(SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(2,)), CPU)
    assert [select_tokens(logits, [state])[0].token_id for _ in range(3)] == [3, 3, 2]


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 2.1}, "repetition_penalty"), ({"logit_bias": ((1, 101.0),)}, "logit_bias"),
    ({"logit_bias": ((1, 1.0), (1, 2.0))}, "logit_bias"), ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"), ({"min_p": float("nan")}, "min_p"),
])
def test_invalid_controls_name_the_parameter(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(SamplingParamsError, match=f"^{name}"):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def reference_generate(loaded, prompt: list[int], p: SamplingParams, *, penalize_prompt: bool = True) -> list[int]:
    """Greedy decoding with the reference controls, recomputing the whole sequence each step (one row, no cache
    reuse, no batch), ending on a stop token id as the engine does."""
    ids, out = list(prompt), []
    for _ in range(p.max_tokens):
        with torch.inference_mode():
            logits = loaded.model(input_ids=torch.tensor([ids]), use_cache=True,
                                  **{cache_kwarg_name(loaded.model): DynamicCache()}).logits[0, -1]
        tok = int(reference_controls(logits, p, prompt if penalize_prompt else [], out).argmax())
        out.append(tok)
        ids.append(tok)
        if tok in p.stop_token_ids:
            break
    return out


async def test_engine_rows_match_the_reference_alone_and_batched(tiny_llama) -> None:
    """Through the running engine (prompt ids reach repetition_penalty, stop_token_ids end rows): every controlled
    row gives the reference's tokens, alone and in one batch with each other and with seeded rows."""
    engine = make_engine(tiny_llama, max_batch_rows=8)
    try:
        engine.eos_token_ids = frozenset()
        base = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        plain = await collect(engine, GenerationRequest([1, 2, 3], base))
        rep = dataclasses.replace(base, repetition_penalty=2.0)
        # A prompt holding tokens the row would generate, so that penalizing the prompt's tokens shows.
        rep_prompt = next(q for q in ([1, 2, 3, *plain.tokens[:k]] for k in range(1, 6))
                          if reference_generate(tiny_llama, q, rep) != reference_generate(
                              tiny_llama, q, rep, penalize_prompt=False))
        controlled = [dataclasses.replace(base, **kw) for kw in (
            {"repetition_penalty": 2.0}, {"frequency_penalty": 2.0, "presence_penalty": 1.0},
            {"logit_bias": ((plain.tokens[0], -100.0), (40, 8.0))},
            {"stop_token_ids": (plain.tokens[3],)},
        )]
        seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=9, min_p=0.02, frequency_penalty=0.5)
        requests = [GenerationRequest(rep_prompt if i == 0 else [1, 2, 3] if i % 2 else [4, 4, 5, 4], p)
                    for i, p in enumerate([*controlled, seeded, base])]
        alone = [await collect(engine, dataclasses.replace(r, request_id=f"a{i}")) for i, r in enumerate(requests)]
        for r, got in zip(requests[:4], alone, strict=False):
            assert got.tokens == reference_generate(tiny_llama, r.prompt_ids, r.sampling)
        stopped = alone[3]
        assert stopped.final is not None and stopped.final.finish_reason == "stop"
        assert stopped.tokens[-1] == plain.tokens[3] and len(stopped.tokens) <= 4
        together = await asyncio.gather(*[collect(engine, dataclasses.replace(r, request_id=f"b{i}"))
                                          for i, r in enumerate(requests)])
        assert max(engine.stats.batch_sizes) > 1
        for i, (a, b) in enumerate(zip(alone, together, strict=True)):
            assert a.tokens == b.tokens and a.text == b.text, f"request {i}"
        assert all(a.tokens != plain.tokens for a in alone[:3])
    finally:
        engine.stop()
