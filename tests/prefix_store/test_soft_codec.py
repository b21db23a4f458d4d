"""The soft-prompt format (prefixserve-soft-prompt/1), the PEFT soft-prompt codec's refusals, and soft prompts in the
resolver: decoded by format, cast to the served dtype, pooled, and refused in a stack."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save

from prefix_store.blobs import FileBlobStore
from prefix_store.cache_tier import InProcessTier
from prefix_store.codec import decode_stored, encode_native, encode_stored
from prefix_store.device_pool import DevicePool
from prefix_store.peft_soft import decode_peft_adapter, encode_peft_soft
from prefix_store.ref import PrefixRef
from prefix_store.resolver import PrefixResolver
from prefix_store.soft_codec import decode_soft
from prefix_store.types import ModelSpec, PrefixError, PrefixKV, SoftPrompt

SPEC = ModelSpec(model_id="m", fingerprint="f" * 64, num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32",
                 hidden_size=24)


def _soft(p: int = 5, *, seed: int = 0, dtype: torch.dtype = torch.float32, kind: str = "prompt_tuning") -> SoftPrompt:
    gen = torch.Generator().manual_seed(seed)
    return SoftPrompt(embeddings=torch.randn(p, SPEC.hidden_size, generator=gen).to(dtype), kind=kind,  # type: ignore[arg-type]
                      base_fingerprint=SPEC.fingerprint, created_by="test", metadata={"note": "x"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact_and_deterministic(dtype: torch.dtype) -> None:
    soft = _soft(dtype=dtype, kind="p_tuning")
    data = encode_stored(soft)
    assert data == encode_stored(_soft(dtype=dtype, kind="p_tuning"))  # equal prompts, equal bytes
    got = decode_stored(data, spec=SPEC, max_virtual_tokens=16, max_bytes=2**20)
    assert isinstance(got, SoftPrompt) and got.kind == "p_tuning" and got.metadata == {"note": "x"}
    assert got.embeddings.dtype == dtype and torch.equal(got.embeddings, soft.embeddings)


@pytest.mark.parametrize(("spec_change", "p", "fragment"), [
    ({"fingerprint": "g" * 64}, 5, "fingerprint"),
    ({"hidden_size": 32}, 5, "expected hidden = 32"),
    ({"hidden_size": 0}, 5, "does not declare its hidden size"),
    ({}, 17, "between 1 and 16, found 17"),
])
def test_decode_refuses_what_does_not_fit(spec_change: dict[str, object], p: int, fragment: str) -> None:
    data = encode_stored(_soft(p))
    with pytest.raises(PrefixError, match=fragment):
        decode_soft(data, spec=dataclasses.replace(SPEC, **spec_change), max_virtual_tokens=16, max_bytes=2**20)


def test_nan_is_refused() -> None:
    soft = _soft()
    soft.embeddings[1, 2] = float("nan")
    with pytest.raises(PrefixError, match="1 NaN/Inf"):
        decode_soft(encode_stored(soft), spec=SPEC, max_virtual_tokens=16, max_bytes=2**20)


def _peft_pair(**cfg_changes: object) -> tuple[bytes, bytes]:
    files = encode_peft_soft(_soft(4), spec=SPEC, base_model_name_or_path="m")
    cfg = {**json.loads(files["adapter_config.json"]), **cfg_changes}
    return json.dumps(cfg).encode(), files["adapter_model.safetensors"]


def test_peft_pair_round_trip() -> None:
    soft, info = decode_peft_adapter(*_peft_pair(), spec=SPEC, max_virtual_tokens=16, max_bytes=2**20)
    assert isinstance(soft, SoftPrompt) and soft.kind == "prompt_tuning" and not info.name_mismatch
    assert torch.equal(soft.embeddings, _soft(4).embeddings)


def test_p_tuning_encoder_weights_that_do_not_fit_their_config_are_refused() -> None:
    config, _ = _peft_pair(peft_type="P_TUNING", encoder_hidden_size=8, encoder_reparameterization_type="MLP")
    weights = save({"embedding.weight": torch.randn(4, 24), "mlp_head.0.weight": torch.randn(8, 24)})
    with pytest.raises(PrefixError, match="do not fit its config"):
        decode_peft_adapter(config, weights, spec=SPEC, max_virtual_tokens=16, max_bytes=2**20)
    config, _ = _peft_pair(peft_type="P_TUNING", encoder_hidden_size=8, encoder_reparameterization_type="GRU")
    with pytest.raises(PrefixError, match="expected one of \\['MLP', 'LSTM'\\]"):
        decode_peft_adapter(config, weights, spec=SPEC, max_virtual_tokens=16, max_bytes=2**20)


def test_resolver_loads_casts_pools_and_refuses_a_stack(tmp_path) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    soft = _soft()
    kv = PrefixKV(keys=torch.zeros(2, 2, 3, 8), values=torch.zeros(2, 2, 3, 8), base_fingerprint=SPEC.fingerprint)
    refs = [PrefixRef(tenant_id="t", prefix_id=f"p{i}", name=n, version=1, sha256=blobs.put(data), num_virtual_tokens=p,
                      kind=k)
            for i, (n, data, p, k) in enumerate((("soft", encode_stored(soft), 5, "prompt_tuning"),
                                                 ("kv", encode_native(kv), 3, "prefix_tuning")))]
    resolver = PrefixResolver(catalog=None, pool=DevicePool(2**20), cache=InProcessTier(60, 2**20),  # type: ignore[arg-type]
                              blobs=blobs, spec=SPEC, dtype=torch.bfloat16, max_virtual_tokens=16)
    got = resolver.load(refs[0])
    assert got.source == "blob" and isinstance(got.kv, SoftPrompt)
    assert got.kv.embeddings.dtype == torch.bfloat16 and torch.equal(got.kv.embeddings, soft.embeddings.bfloat16())
    assert resolver.load(refs[0]).source == "device"
    with pytest.raises(PrefixError, match="soft prompts cannot be stacked"):
        resolver.load_stack(refs)
    assert resolver.load_stack(refs[1:]).num_virtual_tokens == 3
