"""Soft prompts (PEFT PROMPT_TUNING and P_TUNING) in the engine: PEFT's greedy tokens, batch invariance next to KV
prefixes and plain rows, the quantized serving modes, and P_TUNING's prompt encoder run once at import.

The PEFT reference is a greedy loop over `PeftModel.forward` on the whole sequence (as for prefixes in
test_peft_equivalence.py): `PeftModel.generate` with a prompt-learning adapter leaves the forward's tokens after the
second one on transformers 5.25 / peft 0.21.2 (seen on tiny-llama with a P_TUNING adapter), so it cannot be the
reference here.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from peft import PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import save_file

from app.engine.quantized import kernels_available
from app.engine.sampling import SamplingParams
from app.engine.types import GenerationRequest
from prefix_store.peft_soft import decode_peft_adapter
from prefix_store.types import PrefixKV, SoftPrompt
from tests.engine.helpers import collect, make_engine, random_prefix

CONFIGS = {
    "prompt": lambda p: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p),
    "p-mlp": lambda p: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=p, encoder_hidden_size=32),
    "p-lstm": lambda p: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=p, encoder_hidden_size=16,
                                            encoder_reparameterization_type="LSTM"),
}


def _peft_model(loaded, method: str, p: int, seed: int):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    pm = get_peft_model(loaded.model, CONFIGS[method](p))
    with torch.no_grad():
        for param in pm.prompt_encoder["default"].parameters():
            param.copy_(torch.randn_like(param))
    pm.eval()
    return pm


def make_soft_adapter(loaded, tmp_path, name: str, method: str, p: int, seed: int):  # type: ignore[no-untyped-def]
    """A PEFT adapter directory saved by `save_pretrained` (random weights, so the soft prompt matters)."""
    pm = _peft_model(loaded, method, p, seed)
    d = tmp_path / name
    pm.save_pretrained(d)
    return d


def peft_greedy(model, prompt: list[int], steps: int) -> list[int]:  # type: ignore[no-untyped-def]
    ids, out = list(prompt), []
    for _ in range(steps):
        with torch.inference_mode():
            mask = torch.ones(1, len(ids), dtype=torch.long)
            logits = model(input_ids=torch.tensor([ids]), attention_mask=mask).logits
        out.append(int(logits[0, -1].argmax()))
        ids.append(out[-1])
    return out


def decode_dir(d, spec) -> SoftPrompt:  # type: ignore[no-untyped-def]
    soft, _ = decode_peft_adapter((d / "adapter_config.json").read_bytes(),
                                  (d / "adapter_model.safetensors").read_bytes(),
                                  spec=spec, max_virtual_tokens=64, max_bytes=2**24)
    assert isinstance(soft, SoftPrompt)
    return soft


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_gpt2"])
async def test_soft_prompts_match_peft_and_are_batch_invariant(model_fixture, request, tmp_path) -> None:
    """PROMPT_TUNING and P_TUNING (MLP, LSTM) adapters, served together with a KV-prefix row and a plain row: each
    soft-prompt row gives PeftModel's greedy tokens, and every row gives the same tokens (logprobs within 1e-3)
    alone as in the mixed batch."""
    loaded = request.getfixturevalue(model_fixture)
    specs = [("a", "prompt", 4, 1), ("b", "p-mlp", 7, 2), ("c", "p-lstm", 1, 3)]
    dirs = {n: make_soft_adapter(loaded, tmp_path, n, m, p, s) for n, m, p, s in specs}
    prompts = {"a": [3, 4, 5, 6], "b": [7, 8], "c": [9, 10, 11, 12, 13, 14], "kv": [15, 16, 17], "plain": [18]}
    steps = 10
    expected = {}
    for name, d in dirs.items():
        pm = PeftModel.from_pretrained(loaded.model, str(d))
        pm.eval()
        expected[name] = peft_greedy(pm, prompts[name], steps)
    base = {n: peft_greedy(loaded.model, prompts[n], steps) for n in dirs}
    assert base != expected  # the soft prompts matter

    prefixes = {n: decode_dir(d, loaded.spec) for n, d in dirs.items()}
    assert {n: p.kind for n, p in prefixes.items()} == {"a": "prompt_tuning", "b": "p_tuning", "c": "p_tuning"}
    prefixes_all = {**prefixes, "kv": random_prefix(loaded, 5, seed=4), "plain": None}
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True, logprobs=0)
    engine = make_engine(loaded)
    try:
        reqs = {n: GenerationRequest(prompts[n], params, prefix=x) for n, x in prefixes_all.items()}
        alone = {n: await collect(engine, r) for n, r in reqs.items()}
        together = await asyncio.gather(*[collect(engine, r, delay=0.02 * (n == "c")) for n, r in reqs.items()])
    finally:
        engine.stop()
    for name, res in zip(reqs, together, strict=True):
        if name in expected:
            assert alone[name].tokens == expected[name], name
        assert res.tokens == alone[name].tokens, name
        assert max(abs(a - b) for a, b in zip(res.logprobs, alone[name].logprobs, strict=True)) <= 1e-3, name


def test_p_tuning_encoder_weights_are_run_once_at_import(tiny_llama, tmp_path) -> None:
    """A P_TUNING file holding the prompt encoder's weights (MLP and LSTM) is run through PEFT's PromptEncoder
    once: the stored embeddings are exactly what PEFT saves (its encoder's output)."""
    for method, p in (("p-mlp", 6), ("p-lstm", 3)):
        pm = _peft_model(tiny_llama, method, p, seed=5)
        with torch.no_grad():  # PyTorch's CPU LSTM takes another kernel under autograd (1e-5 apart)
            want = pm.get_prompt_embedding_to_save("default")  # [P, hidden]
        state = {f"prompt_encoder.default.{k}": v.detach().contiguous()
                 for k, v in pm.prompt_encoder["default"].state_dict().items()}
        d = tmp_path / method
        pm.save_pretrained(d)  # for its adapter_config.json
        save_file(state, d / "adapter_model.safetensors")
        soft = decode_dir(d, tiny_llama.spec)
        assert soft.embeddings.shape == (p, tiny_llama.spec.hidden_size)
        assert torch.equal(soft.embeddings, want.float()), method


@pytest.mark.skipif(not kernels_available(), reason="this torch build has no CPU int4/int8 kernels")
@pytest.mark.parametrize("weights", ["int4", "int8"])
async def test_soft_prompt_in_quantized_modes_is_batch_invariant(tiny_llama, tmp_path, weights) -> None:
    """int4 / int8 serving: a soft-prompt row gives the same tokens and bitwise the same logprobs alone and next to a
    KV-prefix row and a plain row, and its tokens differ from the same prompt without it."""
    soft = decode_dir(make_soft_adapter(tiny_llama, tmp_path, "s", "prompt", 5, 6), tiny_llama.spec)
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10], [11]]
    prefixes = [soft, random_prefix(tiny_llama, 4, seed=1), None]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)
    engine = make_engine(tiny_llama, weights=weights)
    try:
        reqs = [GenerationRequest(p, params, prefix=x) for p, x in zip(prompts, prefixes, strict=True)]
        alone = [await collect(engine, r) for r in reqs]
        together = await asyncio.gather(*[collect(engine, r) for r in reqs])
        without = await collect(engine, GenerationRequest(prompts[0], params))
    finally:
        engine.stop()
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.logprobs for r in together] == [r.logprobs for r in alone]
    assert without.tokens != alone[0].tokens


def test_batch_layout_of_a_soft_prompt_row() -> None:
    """Row layout (docs/batching.md): a soft prompt's V columns sit right before its prompt at positions 0..V-1, the
    prompt at V + j; a KV-prefix row beside it keeps its layout; the soft columns are marked only at the prefill."""
    from app.engine.batch import Batch, KVGeometry, NewRow
    from app.engine.sampling import SamplerState

    geometry = KVGeometry(num_layers=1, kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))
    kv = PrefixKV(keys=torch.ones(1, 1, 2, 2), values=torch.ones(1, 1, 2, 2))
    soft = SoftPrompt(embeddings=torch.full((3, 4), 5.0))

    def row(rid: str, prompt: list[int], prefix: object) -> NewRow:
        return NewRow(rid, prompt, prefix, SamplerState.create(SamplingParams(temperature=0.0), geometry.device))  # type: ignore[arg-type]

    batch = Batch.from_requests([row("s", [7, 8], soft), row("k", [9], kv)], geometry=geometry, pad_token_id=0)
    assert batch.input_ids.tolist() == [[0, 0, 0, 7, 8], [0, 0, 0, 0, 9]]  # Q = V + S = 5
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 0, 2]]
    assert batch.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 1]]  # [P_max = 2 | Q = 5]
    assert [(r.prefix_len, r.prompt_len) for r in batch.rows] == [(3, 2), (2, 1)]
    assert batch.soft is not None
    assert batch.soft.slots[..., 0].tolist() == [[True, True, True, False, False], [False] * 5]
    tokens = torch.arange(40.0).view(2, 5, 4)  # stand-in token embeddings [B, Q, hidden]
    mixed = batch.soft.apply(tokens)
    assert torch.equal(mixed[0, :3], soft.embeddings) and torch.equal(mixed[0, 3:], tokens[0, 3:])
    assert torch.equal(mixed[1], tokens[1])  # a row without a soft prompt: its own embeddings, untouched
    batch.advance([1, 2])
    assert batch.soft is None and batch.position_ids.tolist() == [[5], [3]]
