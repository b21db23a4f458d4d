"""oneDNN-packed linears: same outputs as `nn.Linear`, gradients unaffected, the engine's tokens unchanged."""

from __future__ import annotations

import pytest
import torch

from app.engine.packed_linear import PackedLinear, pack_linears, packing_available
from app.engine.sampling import SamplingParams
from app.engine.types import GenerationRequest
from tests.engine.helpers import collect, make_engine, random_prefix

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")


def _linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_packs_every_frozen_fp32_linear_in_place(tiny_llama) -> None:
    model = tiny_llama.model
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    n_linear = len(_linears(model))
    assert pack_linears(model) == n_linear > 0
    assert all(type(m) is PackedLinear for m in _linears(model))
    # parameters (and tied weights) are the same tensors under the same names
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert pack_linears(model) == 0  # already packed


def test_skips_trainable_and_non_fp32_linears() -> None:
    trainable = torch.nn.Linear(8, 4)
    half = torch.nn.Linear(8, 4).to(torch.bfloat16).requires_grad_(False)
    model = torch.nn.Sequential(trainable, half)
    assert pack_linears(model) == 0
    assert type(trainable) is torch.nn.Linear and type(half) is torch.nn.Linear


@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (3, 5, 64)])
def test_packed_forward_equals_linear(shape) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96).requires_grad_(False)
    ref_lin = torch.nn.Linear(64, 96).requires_grad_(False)
    ref_lin.load_state_dict(lin.state_dict())
    pack_linears(lin)
    x = torch.randn(*shape)
    with torch.inference_mode():
        got, want = lin(x), ref_lin(x)
    assert got.shape == want.shape == (*shape[:-1], 96)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_take_the_plain_path(tiny_llama) -> None:
    """Training a prefix through the shared model needs input gradients: same as an unpacked model's."""
    model = tiny_llama.model
    ids = torch.tensor([[3, 4, 5, 6, 7]])

    def input_grad() -> torch.Tensor:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=emb).logits.sum().backward()
        assert emb.grad is not None
        return emb.grad

    want = input_grad()
    pack_linears(model)
    torch.testing.assert_close(input_grad(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_gpt2"])
async def test_engine_tokens_same_packed_and_unpacked(model_fixture, request) -> None:
    """Greedy tokens and logprobs of a mixed batch do not depend on the linear kernel."""
    loaded = request.getfixturevalue(model_fixture)
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10], [11]]
    prefixes = [random_prefix(loaded, 4, seed=1), None, random_prefix(loaded, 9, seed=2)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)

    async def run(packed: bool) -> list[tuple[list[int], list[float]]]:
        engine = make_engine(loaded, packed_linears=packed)
        try:
            out = [
                await collect(engine, GenerationRequest(p, params, prefix=k))
                for p, k in zip(prompts, prefixes, strict=True)
            ]
        finally:
            engine.stop()
        return [(r.tokens, r.logprobs) for r in out]

    plain = await run(False)
    assert not any(type(m) is PackedLinear for m in loaded.model.modules())
    packed = await run(True)
    assert any(type(m) is PackedLinear for m in loaded.model.modules())  # GPT-2: its lm_head (the rest is Conv1D)
    for (t0, lp0), (t1, lp1) in zip(plain, packed, strict=True):
        assert t0 == t1
        torch.testing.assert_close(torch.tensor(lp1), torch.tensor(lp0), rtol=0, atol=1e-4)


def test_deepcopy_of_a_packed_model_is_plain_and_keeps_tied_weights(tiny_llama) -> None:
    import copy

    model = tiny_llama.model
    pack_linears(model)
    clone = copy.deepcopy(model)
    assert not any(type(m) is PackedLinear for m in clone.modules())
    assert sorted(clone.state_dict()) == sorted(model.state_dict())
    if model.config.tie_word_embeddings:
        assert clone.lm_head.weight is clone.get_input_embeddings().weight
    ids = torch.tensor([[3, 4, 5]])
    with torch.inference_mode():
        torch.testing.assert_close(clone(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
