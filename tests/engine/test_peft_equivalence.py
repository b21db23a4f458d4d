"""An imported HF PEFT prefix-tuning adapter gives exactly the greedy tokens of `PeftModel.forward`.

The reference is a greedy loop that calls `PeftModel.forward` on the whole sequence each step (on transformers
5.x `PeftModel.generate` drops the prefix, so it cannot be the reference).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

from app.engine.sampling import SamplingParams
from app.engine.types import GenerationRequest
from prefix_store.peft_codec import decode_peft
from tests.engine.helpers import collect, make_engine


def _make_adapter(loaded, tmp_path, name: str, p: int, projection: bool, seed: int):
    cfg = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=p, prefix_projection=projection, encoder_hidden_size=32
    )
    torch.manual_seed(seed)
    pm = get_peft_model(loaded.model, cfg)
    with torch.no_grad():
        for param in pm.prompt_encoder["default"].parameters():
            param.copy_(torch.randn_like(param) * 0.8)
    pm.eval()
    d = tmp_path / name
    pm.save_pretrained(d)
    return d


def _peft_greedy(pm, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    out = []
    for _ in range(steps):
        with torch.inference_mode():
            logits = pm(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)
            ).logits
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
    return out


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("projection", [False, True])
async def test_imported_peft_adapter_matches_peft_forward(
    model_fixture, projection, request, tmp_path
) -> None:
    loaded = request.getfixturevalue(model_fixture)
    specs = [("a", 4, 1), ("b", 9, 2), ("c", 1, 3)]
    dirs = {n: _make_adapter(loaded, tmp_path, n, p, projection, s) for n, p, s in specs}
    prompts = {"a": [3, 4, 5, 6], "b": [7, 8], "c": [9, 10, 11, 12, 13, 14]}
    steps = 10

    expected = {}
    for name, d in dirs.items():
        pm = PeftModel.from_pretrained(loaded.model, str(d))
        pm.eval()
        expected[name] = _peft_greedy(pm, prompts[name], steps)

    prefixes = {}
    for name, d in dirs.items():
        kv, info = decode_peft(
            (d / "adapter_config.json").read_bytes(),
            (d / "adapter_model.safetensors").read_bytes(),
            spec=loaded.spec,
            max_virtual_tokens=64,
            max_bytes=2**24,
        )
        assert info.prefix_projection is projection
        prefixes[name] = kv

    engine = make_engine(loaded)
    try:
        params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
        results = await asyncio.gather(
            *[
                collect(engine, GenerationRequest(prompts[n], params, prefix=prefixes[n]), delay=0.01 * i)
                for i, n in enumerate(dirs)
            ]
        )
    finally:
        engine.stop()
    for name, res in zip(dirs, results, strict=True):
        assert res.tokens == expected[name], f"adapter {name}"
    # the adapters matter: without a prefix the model says something else for at least one of them
    base = [_peft_greedy(loaded.model, prompts[n], steps) for n in dirs]
    assert base != [expected[n] for n in dirs]
