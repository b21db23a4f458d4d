"""Tiny random base models for the codec tests: a 2-layer GQA Llama and a 2-layer GPT-2, fixed seeds."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from prefix_store.types import ModelSpec, PrefixKV


@dataclass(frozen=True)
class TinyModel:
    """A factory for identical fresh copies of one tiny model (peft wraps models in place) and its spec."""

    kind: str
    spec: ModelSpec
    build: Callable[[], PreTrainedModel]


def _llama() -> PreTrainedModel:
    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def _gpt2() -> PreTrainedModel:
    torch.manual_seed(1234)
    cfg = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


TINY_MODELS = {
    # Llama with GQA: 4 query heads, 2 KV heads, head_dim 16 -> PEFT token_dim 32.
    "llama": TinyModel(
        "llama",
        ModelSpec(
            model_id="tiny-llama",
            fingerprint="fp-llama",
            num_layers=2,
            num_kv_heads=2,
            head_dim=16,
            dtype="float32",
        ),
        _llama,
    ),
    # GPT-2: 4 heads of 16 -> token_dim 64.
    "gpt2": TinyModel(
        "gpt2",
        ModelSpec(
            model_id="tiny-gpt2",
            fingerprint="fp-gpt2",
            num_layers=2,
            num_kv_heads=4,
            head_dim=16,
            dtype="float32",
        ),
        _gpt2,
    ),
}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request: pytest.FixtureRequest) -> TinyModel:
    return TINY_MODELS[str(request.param)]


@pytest.fixture
def llama_spec() -> ModelSpec:
    return TINY_MODELS["llama"].spec


def random_prefix(
    spec: ModelSpec, p: int = 5, dtype: torch.dtype = torch.float32, seed: int = 7, **kw: object
) -> PrefixKV:
    """A random prefix for `spec`: keys/values [L, kv_heads, P, head_dim]."""
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, spec.num_kv_heads, p, spec.head_dim)
    keys = torch.randn(shape, generator=g).to(dtype)
    values = torch.randn(shape, generator=g).to(dtype)
    return PrefixKV(keys=keys, values=values, base_fingerprint=spec.fingerprint, **kw)  # type: ignore[arg-type]


def zip_of(files: dict[str, bytes]) -> bytes:
    """A plain zip as a user's tool would make it (member order as given, real timestamps)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buf.getvalue()
