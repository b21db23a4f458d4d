"""PrefixParameters: shapes, PEFT's layout and modules, seeded init, warm start reproducing the init exactly."""

from __future__ import annotations

import pytest
import torch
from peft import PrefixTuningConfig
from peft.tuners.prefix_tuning import PrefixEncoder

from app.training.prefix_params import CREATED_BY, PrefixParameters
from prefix_store.peft_codec import WEIGHTS_KEY, decode_peft, encode_peft
from prefix_store.validate import load_checked
from tests.engine.helpers import random_prefix


@pytest.mark.parametrize("projection", [False, True])
def test_kv_shapes_grad_and_export(tiny, projection) -> None:
    s = tiny.spec
    prefix = PrefixParameters(s, 5, projection=projection, seed=1)
    keys, values = prefix.kv()
    assert keys.shape == values.shape == (s.num_layers, s.num_kv_heads, 5, s.head_dim)
    assert keys.requires_grad and values.requires_grad
    exported = prefix.export({"note": "x"})
    assert not exported.keys.requires_grad and exported.keys.dtype == torch.float32
    assert exported.keys.device.type == "cpu" and exported.keys.is_contiguous()
    assert torch.equal(exported.keys, keys.detach()) and torch.equal(exported.values, values.detach())
    assert exported.base_fingerprint == s.fingerprint and exported.created_by == CREATED_BY
    assert exported.metadata == {"note": "x"}


@pytest.mark.parametrize("projection", [False, True])
def test_flat_layout_is_peft_prompt_embeddings(tiny, projection) -> None:
    """What PEFT would save as `prompt_embeddings` is exactly our flat tensor, and it decodes to our kv()."""
    prefix = PrefixParameters(tiny.spec, 3, projection=projection, seed=2)
    files = encode_peft(prefix.export(), spec=tiny.spec, base_model_name_or_path="x")
    saved = load_checked(files["adapter_model.safetensors"])[WEIGHTS_KEY]
    assert torch.equal(saved, prefix.flat().detach())
    decoded, _ = decode_peft(
        files["adapter_config.json"], files["adapter_model.safetensors"], spec=tiny.spec,
        max_virtual_tokens=64, max_bytes=2**24,
    )
    keys, values = prefix.kv()
    assert torch.equal(decoded.keys, keys.detach()) and torch.equal(decoded.values, values.detach())


def test_projection_modules_load_into_peft_prefix_encoder(tiny_llama) -> None:
    """Same module names and shapes as peft's PrefixEncoder, so the MLP itself is portable, with equal output."""
    s = tiny_llama.spec
    ours = PrefixParameters(s, 4, projection=True, encoder_hidden_size=24, seed=3)
    cfg = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=24,
        token_dim=s.token_dim, num_layers=s.num_layers, num_attention_heads=s.num_kv_heads,
    )
    peft_encoder = PrefixEncoder(cfg)
    peft_encoder.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(peft_encoder(torch.arange(4)), ours.flat())


@pytest.mark.parametrize("projection", [False, True])
def test_seeded_init(tiny_llama, projection) -> None:
    a = PrefixParameters(tiny_llama.spec, 4, projection=projection, seed=5).export()
    b = PrefixParameters(tiny_llama.spec, 4, projection=projection, seed=5).export()
    c = PrefixParameters(tiny_llama.spec, 4, projection=projection, seed=6).export()
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert not torch.equal(a.keys, c.keys)


def test_init_leaves_the_global_rng_alone(tiny_llama) -> None:
    """The serving thread may sample from torch's global generator; building a prefix must not advance it."""
    before = torch.get_rng_state()
    PrefixParameters(tiny_llama.spec, 4, projection=True, seed=1)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("projection", [False, True])
def test_warm_start_reproduces_init_exactly(tiny, projection) -> None:
    init = random_prefix(tiny, 6, seed=11)
    prefix = PrefixParameters(tiny.spec, 6, projection=projection, init=init, seed=1)
    out = prefix.export()
    assert torch.equal(out.keys, init.keys) and torch.equal(out.values, init.values)
    if projection:
        # ...and the MLP is still trainable from there: its output layer gets a non-zero gradient.
        keys, values = prefix.kv()
        (keys.square().sum() + values.sum()).backward()
        last = prefix.transform[-1]
        assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0


def test_warm_start_must_fit(tiny_llama, tiny_gpt2) -> None:
    with pytest.raises(ValueError, match="num_virtual_tokens must equal"):
        PrefixParameters(tiny_llama.spec, 5, init=random_prefix(tiny_llama, 6, seed=1))
    other = random_prefix(tiny_llama, 4, seed=1)
    with pytest.raises(ValueError, match="another base model"):
        PrefixParameters(tiny_llama.spec, 4, init=type(other)(other.keys, other.values, base_fingerprint="f00"))
    with pytest.raises(ValueError, match="shape"):
        PrefixParameters(tiny_gpt2.spec, 4, init=other)
    with pytest.raises(ValueError, match="at least 1"):
        PrefixParameters(tiny_llama.spec, 0)
