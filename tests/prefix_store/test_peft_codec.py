"""HF PEFT import/export, checked against real peft on tiny Llama (GQA) and GPT-2 models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import save as st_save

from prefix_store.codec import decode_native, encode_native
from prefix_store.peft_codec import (
    PeftInfo,
    decode_peft,
    decode_peft_zip,
    encode_peft,
    encode_peft_zip,
)
from prefix_store.peft_zip import CONFIG_NAME, WEIGHTS_NAME
from prefix_store.types import ModelSpec, PrefixError, PrefixKV
from prefix_store.validate import dump_safetensors
from tests.prefix_store.conftest import TinyModel, random_prefix, zip_of

MAX_P = 64
MAX_BYTES = 1 << 20
P = 5


def peft_prompt_kv(peft_model: PeftModel) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer keys/values [kv_heads, P, head_dim] of the cache PeftModel builds for one row."""
    with torch.no_grad():
        cache = peft_model.get_prompt(batch_size=1)
    layers = cache.layers
    assert all(layer.keys.shape[0] == 1 for layer in layers)
    return [layer.keys[0] for layer in layers], [layer.values[0] for layer in layers]


def make_real_adapter(tiny: TinyModel, out: Path, *, projection: bool) -> PeftModel:
    """Train-free real peft adapter with random (non-zero) weights, saved to `out`."""
    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection)
    pm = get_peft_model(tiny.build(), cfg)
    torch.manual_seed(99)
    with torch.no_grad():
        for param in pm.prompt_encoder["default"].parameters():
            param.normal_(0.0, 0.5)
    pm.eval()
    pm.save_pretrained(str(out))
    return pm


def decode_dir(path: Path, spec: ModelSpec, **kw: int) -> tuple[PrefixKV, PeftInfo]:
    args = {"max_virtual_tokens": MAX_P, "max_bytes": MAX_BYTES, **kw}
    return decode_peft(
        (path / CONFIG_NAME).read_bytes(), (path / WEIGHTS_NAME).read_bytes(), spec=spec, **args
    )


def dir_files(path: Path, folder: str = "") -> dict[str, bytes]:
    return {f"{folder}{p.name}": p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("projection", [False, True])
def test_real_peft_adapter_decodes_to_peft_prompt(
    tiny_model: TinyModel, tmp_path: Path, projection: bool
) -> None:
    pm = make_real_adapter(tiny_model, tmp_path, projection=projection)
    prefix, info = decode_dir(tmp_path, tiny_model.spec)
    ref_k, ref_v = peft_prompt_kv(pm)
    assert prefix.keys.shape == (2, tiny_model.spec.num_kv_heads, P, 16)
    assert prefix.keys.abs().sum() > 0
    for layer in range(2):
        assert torch.equal(prefix.keys[layer], ref_k[layer])
        assert torch.equal(prefix.values[layer], ref_v[layer])
    assert not torch.equal(prefix.keys, prefix.values)
    assert info.prefix_projection is projection and info.num_virtual_tokens == P
    assert prefix.base_fingerprint is None

    # The same adapter zipped in a subfolder (with README.md beside it).
    zprefix, _ = decode_peft_zip(
        zip_of(dir_files(tmp_path, "my-adapter/")),
        spec=tiny_model.spec,
        max_virtual_tokens=MAX_P,
        max_bytes=MAX_BYTES,
    )
    assert torch.equal(zprefix.keys, prefix.keys) and torch.equal(zprefix.values, prefix.values)

    # peft itself, loading the saved adapter (the MLP is gone), gives the same cache.
    loaded = PeftModel.from_pretrained(tiny_model.build(), str(tmp_path)).eval()
    lk, lv = peft_prompt_kv(loaded)
    for layer in range(2):
        assert torch.equal(prefix.keys[layer], lk[layer]) and torch.equal(prefix.values[layer], lv[layer])


def test_projection_saves_mlp_output_not_mlp(llama_spec: ModelSpec, tmp_path: Path) -> None:
    from tests.prefix_store.conftest import TINY_MODELS

    pm = make_real_adapter(TINY_MODELS["llama"], tmp_path, projection=True)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["prefix_projection"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"]
        flat = f.get_tensor("prompt_embeddings")
    enc = pm.prompt_encoder["default"]
    with torch.no_grad():
        projected = enc.transform(enc.embedding(torch.arange(P)))
    assert flat.shape == (P, 2 * 2 * 32) and torch.equal(flat, projected)


def test_our_export_loads_in_peft(tiny_model: TinyModel, tmp_path: Path) -> None:
    spec = tiny_model.spec
    prefix = random_prefix(spec, p=P)
    files = encode_peft(prefix, spec=spec, base_model_name_or_path="org/tiny")
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    loaded = PeftModel.from_pretrained(tiny_model.build(), str(tmp_path)).eval()
    lk, lv = peft_prompt_kv(loaded)
    for layer in range(2):
        assert torch.equal(prefix.keys[layer], lk[layer]) and torch.equal(prefix.values[layer], lv[layer])

    # Our config has exactly the fields real peft writes, with the same values for this model.
    real_dir = tmp_path / "real"
    make_real_adapter(tiny_model, real_dir, projection=False)
    ours, real = json.loads(files[CONFIG_NAME]), json.loads((real_dir / CONFIG_NAME).read_text())
    assert ours.keys() == real.keys()
    assert {k: v for k, v in ours.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in real.items() if k != "base_model_name_or_path"
    }
    assert ours["base_model_name_or_path"] == "org/tiny"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_peft_native_round_trip(llama_spec: ModelSpec, dtype: torch.dtype) -> None:
    prefix = random_prefix(llama_spec, p=P, dtype=dtype)
    native = encode_native(prefix)
    first = decode_native(native, spec=llama_spec, max_virtual_tokens=MAX_P, max_bytes=MAX_BYTES)
    z = encode_peft_zip(first, spec=llama_spec, base_model_name_or_path="tiny-llama", folder="adapter")
    assert z == encode_peft_zip(
        first, spec=llama_spec, base_model_name_or_path="tiny-llama", folder="adapter"
    )
    back, info = decode_peft_zip(z, spec=llama_spec, max_virtual_tokens=MAX_P, max_bytes=MAX_BYTES)
    assert info.name_mismatch is False and info.base_model_name_or_path == "tiny-llama"
    assert back.keys.dtype == torch.float32
    assert torch.equal(back.keys.to(dtype), prefix.keys) and torch.equal(back.values.to(dtype), prefix.values)
    again = PrefixKV(back.keys.to(dtype), back.values.to(dtype), llama_spec.fingerprint)
    assert encode_native(again) == native
    assert torch.equal(
        decode_native(encode_native(again), spec=None, max_virtual_tokens=MAX_P, max_bytes=MAX_BYTES).keys,
        prefix.keys,
    )


def test_flat_layout_formula(llama_spec: ModelSpec) -> None:
    prefix = random_prefix(llama_spec, p=3)
    files = encode_peft(prefix, spec=llama_spec, base_model_name_or_path="x")
    from safetensors.torch import load

    flat = load(files[WEIGHTS_NAME])["prompt_embeddings"]
    h, d = llama_spec.num_kv_heads, llama_spec.head_dim
    for t, layer, s, head, dd in [(0, 0, 0, 0, 0), (2, 1, 1, 1, 15), (1, 1, 0, 1, 7), (2, 0, 1, 0, 3)]:
        src = prefix.keys if s == 0 else prefix.values
        assert flat[t, ((2 * layer + s) * h + head) * d + dd] == src[layer, head, t, dd]


def test_name_mismatch_reported(llama_spec: ModelSpec) -> None:
    files = encode_peft(random_prefix(llama_spec), spec=llama_spec, base_model_name_or_path="HuggingFaceTB/x")
    _, info = decode_peft(*files.values(), spec=llama_spec, max_virtual_tokens=MAX_P, max_bytes=MAX_BYTES)
    assert info.name_mismatch is True and info.base_model_name_or_path == "HuggingFaceTB/x"


# ---- refusals ----


def _files(spec: ModelSpec, p: int = P) -> tuple[dict[str, object], bytes]:
    files = encode_peft(random_prefix(spec, p=p), spec=spec, base_model_name_or_path="tiny-llama")
    return json.loads(files[CONFIG_NAME]), files[WEIGHTS_NAME]


def _decode(cfg: dict[str, object] | bytes, weights: bytes, spec: ModelSpec, **kw: int) -> None:
    raw = cfg if isinstance(cfg, bytes) else json.dumps(cfg).encode()
    args = {"max_virtual_tokens": MAX_P, "max_bytes": MAX_BYTES, **kw}
    decode_peft(raw, weights, spec=spec, **args)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("peft_type", "LORA", "peft_type is 'LORA', expected 'PREFIX_TUNING'"),
        ("task_type", "SEQ_2_SEQ_LM", "task_type is 'SEQ_2_SEQ_LM'"),
        ("num_transformer_submodules", 2, "num_transformer_submodules is 2"),
        ("num_layers", 3, "num_layers is 3, the served model 'tiny-llama' needs 2"),
        ("num_attention_heads", 4, "num_attention_heads is 4, .* needs 2"),  # query heads: pre-GQA-fix peft
        ("token_dim", 64, "token_dim is 64, .* needs 32"),
        ("num_virtual_tokens", 0, "between 1 and 64, found 0"),
        ("num_virtual_tokens", 65, "between 1 and 64, found 65"),
        ("num_virtual_tokens", "5", "num_virtual_tokens must be an integer"),
        ("prefix_projection", "yes", "prefix_projection must be true or false"),
    ],
)
def test_config_refusals(llama_spec: ModelSpec, field: str, value: object, match: str) -> None:
    cfg, weights = _files(llama_spec)
    cfg[field] = value
    with pytest.raises(PrefixError, match=match):
        _decode(cfg, weights, llama_spec)


def test_weights_refusals(llama_spec: ModelSpec) -> None:
    cfg, weights = _files(llama_spec)
    flat = torch.randn(P, 128)
    with pytest.raises(PrefixError, match="not valid JSON"):
        _decode(b"{", weights, llama_spec)
    with pytest.raises(PrefixError, match="not valid JSON"):
        _decode(b"[" * 100_000, weights, llama_spec)
    with pytest.raises(PrefixError, match="too large"):
        _decode(cfg, weights, llama_spec, max_bytes=len(weights))
    with pytest.raises(PrefixError, match="not a valid safetensors file"):
        _decode(cfg, b"\x80\x02}q\x00." + b"\0" * 20, llama_spec)  # a pickle is not safetensors
    with pytest.raises(PrefixError, match=r"missing \['prompt_embeddings'\]"):
        _decode(cfg, dump_safetensors({"embedding.weight": flat}, {}), llama_spec)
    with pytest.raises(PrefixError, match=r"unexpected \['transform.0.weight'\]"):
        _decode(
            cfg, dump_safetensors({"prompt_embeddings": flat, "transform.0.weight": flat}, {}), llama_spec
        )
    with pytest.raises(PrefixError, match=r"shape \[5, 256\], expected .* = \[5, 128\]"):
        _decode(cfg, dump_safetensors({"prompt_embeddings": torch.randn(P, 256)}, {}), llama_spec)
    with pytest.raises(PrefixError, match=r"shape \[4, 128\], expected .* = \[5, 128\]"):
        _decode(cfg, dump_safetensors({"prompt_embeddings": torch.randn(4, 128)}, {}), llama_spec)
    with pytest.raises(PrefixError, match="dtype 'I64', expected a float type"):
        _decode(cfg, st_save({"prompt_embeddings": torch.zeros(P, 128, dtype=torch.long)}), llama_spec)
    flat[2, 5] = float("nan")
    with pytest.raises(PrefixError, match="prompt_embeddings holds 1 NaN/Inf"):
        _decode(cfg, dump_safetensors({"prompt_embeddings": flat}, {}), llama_spec)


def test_half_precision_weights_widen_exactly(llama_spec: ModelSpec) -> None:
    cfg, _ = _files(llama_spec)
    flat = torch.randn(P, 128).to(torch.bfloat16)
    prefix, _ = decode_peft(
        json.dumps(cfg).encode(),
        dump_safetensors({"prompt_embeddings": flat}, {}),
        spec=llama_spec,
        max_virtual_tokens=MAX_P,
        max_bytes=MAX_BYTES,
    )
    assert prefix.keys.dtype == torch.float32
    assert torch.equal(prefix.keys[1, 0, 2], flat[2, 64:80].float())


def test_encode_refuses_wrong_shape(llama_spec: ModelSpec) -> None:
    other = ModelSpec("m", "f", 2, 4, 16, "float32")
    with pytest.raises(PrefixError, match=r"\[2, 2, 5, 16\] does not fit .* expected \[2, 4, 5, 16\]"):
        encode_peft(random_prefix(llama_spec), spec=other, base_model_name_or_path="m")


# ---- zip ----


def test_zipped_adapter_decodes_like_its_files(llama_spec: ModelSpec) -> None:
    """The archive's refusals are tested in test_peft_zip.py; here, a zip (in a folder, with junk beside it)
    decodes to the prefix its files decode to, and a bad archive surfaces as a PrefixError."""
    prefix = random_prefix(llama_spec)
    files = encode_peft(prefix, spec=llama_spec, base_model_name_or_path="tiny-llama")
    direct, _ = decode_peft(files[CONFIG_NAME], files[WEIGHTS_NAME], spec=llama_spec, max_virtual_tokens=MAX_P,
                            max_bytes=MAX_BYTES)
    data = zip_of({**{f"adapter/{n}": c for n, c in files.items()}, "adapter/README.md": b"# hi"})
    zipped, _ = decode_peft_zip(data, spec=llama_spec, max_virtual_tokens=MAX_P, max_bytes=MAX_BYTES)
    assert torch.equal(zipped.keys, direct.keys) and torch.equal(zipped.values, direct.values)
    with pytest.raises(PrefixError, match="could not be read"):
        decode_peft_zip(b"PK\x03\x04 not a zip", spec=llama_spec, max_virtual_tokens=MAX_P, max_bytes=MAX_BYTES)
