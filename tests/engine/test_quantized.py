"""Quantized CPU serving (PREFIXSERVE_WEIGHTS=int4|int8): the kernels' convention, a GGUF's own 4-bit blocks read as
they are, the lean forward against transformers', the engine's batch invariance, and training left untouched."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

from app.config import Settings
from app.engine.batch import Batch, NewRow
from app.engine.model_errors import ModelLoadError
from app.engine.quantized import (
    COMPUTE_DTYPE,
    Int4Rows,
    QuantizedLinear,
    int4_rows_rtn,
    int8_rows_rtn,
    kernels_available,
)
from app.engine.quantized_decoder import KV_DTYPE, QuantizedDecoder, RmsNorm
from app.engine.quantized_gguf import GgufInt4, GgufMismatch
from app.engine.runner import ModelRunner, geometry_of
from app.engine.sampling import SamplerState, SamplingParams
from app.engine.types import GenerationRequest
from app.runtime import engine_options
from tests.engine.helpers import collect, make_engine, random_prefix

pytestmark = pytest.mark.skipif(not kernels_available(), reason="this torch build has no CPU int4/int8 kernels")


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quantize", [int4_rows_rtn, int8_rows_rtn])
def test_kernel_multiplies_by_the_dequantized_weight(quantize) -> None:
    """The packed layout and the (q - 8) * scale + zero / q * scale conventions, against a float reference."""
    rows = quantize(_weight(96, 64))
    lin = QuantizedLinear(rows, bias=torch.arange(96.0))
    x = torch.randn(15, 64)
    want = x.to(COMPUTE_DTYPE).float() @ rows.dequantize().T + torch.arange(96.0)
    got = lin(x)
    assert got.shape == (15, 96) and got.dtype == torch.float32  # bf16 product widened by the float32 bias
    assert QuantizedLinear(rows)(x).dtype == COMPUTE_DTYPE  # no bias: the kernel's bf16, for the consumer to widen
    # within bf16's rounding (activations, scales, outputs) of the product's magnitude
    assert float((got - want).abs().max()) <= 1e-2 * float((want - torch.arange(96.0)).abs().max())
    assert (rows.dequantize() - _weight(96, 64)).abs().max() < 0.3  # and it is a quantization of the weight


@pytest.mark.parametrize("quantize", [int4_rows_rtn, int8_rows_rtn])
def test_a_rows_result_does_not_depend_on_the_other_rows(quantize) -> None:
    """Batch invariance starts here: row i of a matmul has the same bits for any row count and position."""
    lin = QuantizedLinear(quantize(_weight(192, 576)))
    x = torch.randn(40, 576)
    full = lin(x)
    for m in (1, 2, 5, 8, 17, 33):
        assert torch.equal(lin(x[:m]), full[:m]), m
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lin(x[perm]), full[perm])


def test_rms_norm_is_transformers_and_row_invariant() -> None:
    """The four-operator RMSNorm computes F.rms_norm's function, and a row's bits do not depend on its batch."""
    weight, eps = _weight(1, 576)[0], 1e-5
    norm = RmsNorm(weight, eps)
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(1)) * 3
    full = norm(x)
    torch.testing.assert_close(full, torch.nn.functional.rms_norm(x, (576,), weight, eps), rtol=1e-5, atol=1e-6)
    tiny = torch.full((1, 576), 1e-4)  # mean(x^2) far below eps: eps decides, as in the reference
    torch.testing.assert_close(norm(tiny), torch.nn.functional.rms_norm(tiny, (576,), weight, eps))
    for m in (1, 2, 5, 8, 17, 33):
        assert torch.equal(norm(x[:m]), full[:m]), m
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(norm(x[perm]), full[perm])


def _write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (data, qtype) in tensors.items():
        q = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _hf_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' reverse permutation of a "llama" GGUF's q/k rows (modeling_gguf_pytorch_utils)."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def test_gguf_q4_blocks_are_read_as_they_are(tmp_path: Path) -> None:
    """Q4_1 and Q4_0 blocks become int4 rows that dequantize to exactly what transformers loads from the file,
    query rows in transformers' order; a weight the file does not hold stops the load."""
    rng = np.random.default_rng(0)
    q_w, down_w = rng.standard_normal((64, 64), dtype=np.float32), rng.standard_normal((64, 128), dtype=np.float32)
    Q41, Q40 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q4_0
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, {"blk.0.attn_q.weight": (q_w, Q41), "blk.0.ffn_down.weight": (down_w, Q40)})
    config = SimpleNamespace(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    loaded_q = torch.from_numpy(_hf_rows(gguf.quants.dequantize(gguf.quants.quantize(q_w, Q41), Q41), 4))
    loaded_down = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(down_w, Q40), Q40))

    reader = GgufInt4(path, config)
    rows = reader.rows("model.layers.0.self_attn.q_proj", loaded_q)
    assert rows is not None and rows.q.dtype == torch.uint8 and int(rows.q.max()) <= 15
    assert torch.equal(rows.dequantize(), loaded_q)
    down = reader.rows("model.layers.0.mlp.down_proj", loaded_down)
    assert down is not None and torch.equal(down.dequantize(), loaded_down)
    assert reader.rows("model.layers.0.mlp.up_proj", loaded_down) is None  # not in the file
    with pytest.raises(GgufMismatch, match="q_proj"):
        reader.rows("model.layers.0.self_attn.q_proj", torch.from_numpy(q_w))  # rows in GGUF's order


class _FloatLinear:
    """A quantized linear's dequantized weight in float32 (test stand-in: isolates the forward's own math); the
    decoder's layer loop multiplies by `data` with `F.linear` for kind "float"."""

    kind = "float"

    def __init__(self, lin: QuantizedLinear, rows: torch.Tensor) -> None:
        self.weight, self.bias = rows, lin.bias
        self.data, self.scales = rows, rows.new_empty(0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias)


def _rows(loaded, prompts, prefixes) -> list[NewRow]:
    params = SamplingParams(max_tokens=100, temperature=0.0)
    return [NewRow(f"r{i}", p, pre, SamplerState.create(params, loaded.device))
            for i, (p, pre) in enumerate(zip(prompts, prefixes, strict=True))]


def test_lean_forward_computes_what_transformers_does(tiny_llama) -> None:
    """With the same (dequantized) weights, the quantized forward's logits equal transformers' through prefill
    (left padding, prefixes of different lengths) and decode steps: RoPE, masks, GQA and fusion are right."""
    model = tiny_llama.model
    decoder = QuantizedDecoder(model, "int4")
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    layers = list(decoder.layers)
    with torch.no_grad():  # the model takes the dequantized weights; the decoder multiplies by them in float32
        for i, layer in enumerate(layers):
            pre, floats = f"model.layers.{i}", {}
            for attr, names in (("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                ("o", ("self_attn.o_proj",)), ("gate_up", ("mlp.gate_proj", "mlp.up_proj")),
                                ("down", ("mlp.down_proj",))):
                parts = [int4_rows_rtn(linears[f"{pre}.{n}"].weight) for n in names]
                for n, part in zip(names, parts, strict=True):
                    linears[f"{pre}.{n}"].weight.copy_(part.dequantize())
                floats[attr] = _FloatLinear(getattr(layer, attr), Int4Rows.cat(parts).dequantize())
            layers[i] = dataclasses.replace(layer, **floats)
        decoder.set_layers(layers)
        decoder.lm_head = _FloatLinear(decoder.lm_head, model.lm_head.weight)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    prefixes = [random_prefix(tiny_llama, 3, seed=1), None, random_prefix(tiny_llama, 6, seed=2)]
    ref = Batch.from_requests(_rows(tiny_llama, prompts, prefixes), pad_token_id=0,
                              geometry=geometry_of(model, tiny_llama.device, tiny_llama.dtype))
    got = Batch.from_requests(_rows(tiny_llama, prompts, prefixes), pad_token_id=0,
                              geometry=geometry_of(model, tiny_llama.device, KV_DTYPE))
    hf, lean = ModelRunner(model), ModelRunner(model, decoder)
    for _ in range(4):
        want, have = hf.forward(ref), lean.forward(got)
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)
        tokens = want.argmax(-1).tolist()
        ref.advance(tokens)
        got.advance(tokens)


@pytest.mark.parametrize(("weights", "temperature"), [("int4", 0.0), ("int8", 0.0), ("int4", 1.0)])
async def test_engine_tokens_same_alone_and_batched(tiny_llama, weights, temperature) -> None:
    """The engine contract in the quantized modes: each request alone, then all together (mixed prefixes, one
    joining mid-flight), gives the same tokens (greedy, and seeded sampling) and the same logprobs, bit for bit."""
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10], [11], [12, 13]]
    prefixes = [random_prefix(tiny_llama, 4, seed=1), None, random_prefix(tiny_llama, 9, seed=2), None]
    params = SamplingParams(max_tokens=10, temperature=temperature, seed=7, ignore_eos=True, logprobs=0)
    engine = make_engine(tiny_llama, weights=weights)
    try:
        requests = [GenerationRequest(p, params, prefix=x) for p, x in zip(prompts, prefixes, strict=True)]
        alone = [await collect(engine, r) for r in requests]
        together = await asyncio.gather(*[collect(engine, r, delay=0.05 * (i == 3)) for i, r in enumerate(requests)])
    finally:
        engine.stop()
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    # bitwise: the linears' kernels are row-invariant and attention runs in float64 (KV_DTYPE)
    assert [r.logprobs for r in together] == [r.logprobs for r in alone]
    assert all(len(r.tokens) == 10 for r in alone)


def test_training_sees_the_float_model(tiny_llama) -> None:
    """Building a quantized engine changes nothing in the shared model: same parameters, same modules, same
    transformers forward (what training runs)."""
    model = tiny_llama.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {name: type(m) for name, m in model.named_modules()}
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    engine = make_engine(tiny_llama, weights="int4")
    engine.stop()
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_unsupported_model_is_refused_at_start(tiny_gpt2) -> None:
    with pytest.raises(ModelLoadError, match=r"weights 'int4'.*model type 'gpt2'"):
        make_engine(tiny_gpt2, weights="int4")


def test_setting_reaches_the_engine() -> None:
    assert engine_options(Settings(weights="int8"))["weights"] == "int8"
    assert engine_options(Settings())["weights"] == "fp32"
