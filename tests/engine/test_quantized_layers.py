"""The quantized forward's layer loop compiled by TorchScript: the same logits as the loop run as Python, bit for
bit, through a prefill with mixed prefixes and decode steps, and with biased projections; and a Python fallback
when scripting fails."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from app.engine import quantized_layers
from app.engine.batch import Batch, NewRow
from app.engine.quantized import kernels_available
from app.engine.quantized_decoder import KV_DTYPE, QuantizedDecoder
from app.engine.runner import ModelRunner, geometry_of
from app.engine.sampling import SamplerState, SamplingParams
from tests.engine.helpers import random_prefix

pytestmark = pytest.mark.skipif(not kernels_available(), reason="this torch build has no CPU int4/int8 kernels")


def _batch(loaded) -> Batch:
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    prefixes = [random_prefix(loaded, 3, seed=1), None, random_prefix(loaded, 6, seed=2)]
    params = SamplingParams(max_tokens=100, temperature=0.0)
    rows = [NewRow(f"r{i}", p, x, SamplerState.create(params, loaded.device))
            for i, (p, x) in enumerate(zip(prompts, prefixes, strict=True))]
    return Batch.from_requests(rows, pad_token_id=0, geometry=geometry_of(loaded.model, loaded.device, KV_DTYPE))


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_scripted_layers_give_the_python_loops_logits(tiny_llama, mode) -> None:
    scripted = QuantizedDecoder(tiny_llama.model, mode)
    python = QuantizedDecoder(tiny_llama.model, mode, scripted=False)
    assert scripted.scripted and not python.scripted
    a, b = _batch(tiny_llama), _batch(tiny_llama)
    run_a, run_b = ModelRunner(tiny_llama.model, scripted), ModelRunner(tiny_llama.model, python)
    capacity = a.cache.slabs[0].keys.shape[2]
    for _ in range(72):  # the prefill, then decode steps, past the caches' first capacity
        got, want = run_a.forward(a), run_b.forward(b)
        assert torch.equal(got, want)
        assert torch.equal(a.cache.slabs[1].valid()[0], b.cache.slabs[1].valid()[0])
        tokens = want.argmax(-1).tolist()
        a.advance(tokens)
        b.advance(tokens)
    assert a.cache.slabs[0].keys.shape[2] > capacity


def test_a_failed_compilation_leaves_the_python_loop(monkeypatch, caplog) -> None:
    def refuse(fn: object) -> object:
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(torch.jit, "script", refuse)
    assert quantized_layers.layer_loop(scripted=True) is quantized_layers.decoder_layers
    assert "running them as Python" in caplog.text


def test_biased_projections_go_through_the_scripted_layers() -> None:
    """Qwen2's q/k/v carry biases: the scripted function's optional-bias path, against the Python loop."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from app.engine.kv import SlabCache

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         use_sliding_window=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # transformers starts biases at zero, which would not tell a missing bias apart
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    scripted, python = QuantizedDecoder(model, "int4"), QuantizedDecoder(model, "int4", scripted=False)
    assert scripted.scripted and scripted.layers[0].qkv.bias is not None
    ids, positions, mask = torch.tensor([[3, 4, 5, 6]]), torch.arange(4)[None], torch.ones(1, 4, dtype=torch.long)

    def logits(decoder: QuantizedDecoder) -> torch.Tensor:
        cache = SlabCache.allocate(num_layers=2, shape=(1, 2, 0, 16), headroom=8, dtype=KV_DTYPE,
                                   device=torch.device("cpu"))
        with torch.inference_mode():
            return decoder.forward(ids, positions, mask, cache)

    unbiased = QuantizedDecoder(model, "int4")
    layers = []
    for layer in unbiased.layers:
        qkv = copy.copy(layer.qkv)
        qkv.bias = None
        layers.append(dataclasses.replace(layer, qkv=qkv))
    unbiased.set_layers(layers)
    assert torch.equal(logits(scripted), logits(python))
    assert not torch.equal(logits(scripted), logits(unbiased))
