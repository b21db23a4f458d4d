"""Token selection: greedy, top-k/top-p limits, seeds, logprobs, parameter validation."""

from __future__ import annotations

import pytest
import torch

from app.engine.sampling import SamplerState, SamplingParams, SamplingParamsError, select_tokens

CPU = torch.device("cpu")


def _logits(b: int = 3, v: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_with_logprobs() -> None:
    logits = _logits()
    states = [SamplerState.create(SamplingParams(temperature=0.0, logprobs=3), CPU) for _ in range(3)]
    out = select_tokens(logits, states)
    logp = torch.log_softmax(logits, dim=-1)
    for i, c in enumerate(out):
        assert c.token_id == int(logits[i].argmax())
        assert c.logprob == pytest.approx(float(logp[i].max()))
        assert [t for t, _ in c.top_logprobs] == torch.topk(logp[i], 3).indices.tolist()


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = _logits(seed=1)
    for params in (
        SamplingParams(temperature=1.0, top_k=1, seed=3),
        SamplingParams(temperature=1.0, top_p=1e-6, seed=3),
    ):
        out = select_tokens(logits, [SamplerState.create(params, CPU) for _ in range(3)])
        assert [c.token_id for c in out] == logits.argmax(dim=-1).tolist()


def test_top_k_restricts_support() -> None:
    logits = _logits(b=1, seed=2)
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    state = SamplerState.create(SamplingParams(temperature=2.0, top_k=5, seed=7), CPU)
    seen = {select_tokens(logits, [state])[0].token_id for _ in range(200)}
    assert seen <= allowed and len(seen) > 1


def test_seed_reproducible_and_independent_of_neighbours() -> None:
    logits = _logits(b=4, seed=3)
    params = SamplingParams(temperature=1.0, seed=42)
    alone = [select_tokens(logits[1:2], [SamplerState.create(params, CPU)])[0].token_id for _ in range(1)]
    a = SamplerState.create(params, CPU)
    seq_alone = [select_tokens(logits[1:2], [a])[0].token_id for _ in range(20)]
    states = [SamplerState.create(SamplingParams(temperature=1.0, seed=i), CPU) for i in range(4)]
    states[1] = SamplerState.create(params, CPU)
    seq_batch = [select_tokens(logits, states)[1].token_id for _ in range(20)]
    assert seq_alone == seq_batch and seq_alone[0] == alone[0]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"logprobs": 50}, "logprobs"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_invalid_params_name_the_parameter(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(SamplingParamsError, match=name):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def _reference_top_p(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """The definition, one row [V] at a time with a full sort: the kept tokens as a bool mask."""
    sorted_x, order = torch.sort(x, descending=True)
    probs = torch.softmax(sorted_x, dim=-1)
    drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
    return ~torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)


@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])  # wide nuclei (full-vocabulary pass) to peaked ones
def test_top_p_keeps_exactly_the_nucleus(scale: float) -> None:
    from app.engine.sampling import _filtered_logits

    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(5)) * scale
    tps = [0.05, 0.3, 0.5, 0.9, 0.99, 1.0]
    x = _filtered_logits(logits, [SamplingParams(temperature=1.0, top_p=tp) for tp in tps])
    for i, tp in enumerate(tps):
        want = _reference_top_p(logits[i], tp) if tp < 1.0 else torch.ones(1000, dtype=torch.bool)
        assert torch.equal(torch.isfinite(x[i]), want), f"row {i}, top_p {tp}"


def test_top_k_per_row_and_top_k_at_least_vocab_is_off() -> None:
    from app.engine.sampling import _filtered_logits

    logits = _logits(b=3, v=50, seed=6)
    ks = [1, 7, 50]
    x = _filtered_logits(logits, [SamplingParams(temperature=1.0, top_k=k) for k in ks])
    for i, k in enumerate(ks):
        kept = set(torch.nonzero(torch.isfinite(x[i])).flatten().tolist())
        assert kept == set(torch.topk(logits[i], k).indices.tolist())


def test_sampling_follows_the_distribution() -> None:
    """Inverse-CDF draws: frequencies match softmax(logits / T) (5000 draws, 8 tokens)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 1.5, 0.2]])
    state = SamplerState.create(SamplingParams(temperature=0.7, seed=11), CPU)
    counts = torch.zeros(8)
    for _ in range(5000):
        counts[select_tokens(logits, [state])[0].token_id] += 1
    want = torch.softmax(logits[0] / 0.7, dim=-1)
    assert torch.allclose(counts / 5000, want, atol=0.025), (counts / 5000, want)


def test_mixed_batch_each_row_as_alone() -> None:
    """Greedy, sampled (temperature / top-k / top-p), with and without logprobs, in one batch: every row gets
    exactly what it gets alone, step after step (its own generator, nothing shared)."""
    logits_steps = [_logits(b=5, v=300, seed=20 + t) for t in range(8)]
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.9, top_p=0.8, seed=1, logprobs=0),
        SamplingParams(temperature=1.3, top_k=20, seed=2),
        SamplingParams(temperature=0.5, top_p=0.95, top_k=40, seed=3, logprobs=5),
        SamplingParams(temperature=1.0, seed=4),
    ]
    batch_states = [SamplerState.create(p, CPU) for p in params]
    batched = [select_tokens(lg, batch_states) for lg in logits_steps]
    for i, p in enumerate(params):
        alone_state = SamplerState.create(p, CPU)
        alone = [select_tokens(lg[i : i + 1], [alone_state])[0] for lg in logits_steps]
        assert [b[i] for b in batched] == alone, f"row {i}"
        if p.logprobs is not None:
            assert all(c.logprob is not None and len(c.top_logprobs) == p.logprobs for c in alone)
        else:
            assert all(c.logprob is None and c.top_logprobs == () for c in alone)


def test_top_logprobs_do_not_depend_on_what_neighbours_ask() -> None:
    """Tied logprobs: the alternatives a row gets are the same alone and next to a row asking for more."""
    logits = torch.zeros(2, 60)
    logits[:, 10:] = 1.0  # 50 tied top tokens
    asks_2 = SamplerState.create(SamplingParams(temperature=0.0, logprobs=2), CPU)
    alone = select_tokens(logits[:1], [asks_2])[0]
    asks_20 = SamplerState.create(SamplingParams(temperature=0.0, logprobs=20), CPU)
    batched = select_tokens(logits, [asks_2, asks_20])[0]
    assert alone == batched and len(alone.top_logprobs) == 2


def test_non_finite_logits_and_tiny_temperatures_pick_a_real_token() -> None:
    logits = torch.zeros(2, 50)
    logits[0, 16] = float("inf")  # softmax is NaN: the row must still get token 16, not the last id
    logits[1, 7] = 3.0
    states = [SamplerState.create(SamplingParams(temperature=1.0, seed=1), CPU),
              SamplerState.create(SamplingParams(temperature=1e-45, seed=1), CPU)]  # greedy in effect
    assert [c.token_id for c in select_tokens(logits, states)] == [16, 7]
