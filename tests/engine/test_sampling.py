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
