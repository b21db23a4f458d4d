"""Named architectures with random weights: `random:<preset>` sources for tests and benchmarks.

Weights are a pure function of (preset, parameter name): the same preset gives bit-identical weights, and so
the same fingerprint, in every process and on every machine. To get there we avoid torch's normal_/uniform_
arithmetic (its float rounding can differ between CPU instruction sets) and use only exact float operations:
`uniform_(0, 1)` yields k * 2**-24 for an integer k; subtracting 0.5 and scaling by a power of two is exact.

Every config carries the byte tokenizer's fixed special ids, so generate() and the engine agree on them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.initialization import no_init_weights

from app.engine.byte_tokenizer import ENDOFTEXT_ID, IM_END_ID, PAD_ID, build_byte_tokenizer
from app.engine.model_errors import ModelLoadError

logger = logging.getLogger(__name__)

# Weights are uniform on [-INIT_HALF_RANGE, INIT_HALF_RANGE), std ~0.036. A power of two keeps the init
# exact, and the range is wide enough that tiny models have clear argmax gaps (no near-ties in greedy tests).
INIT_HALF_RANGE = 2.0**-4
FILL_CHUNK = 1 << 22  # elements per seeded chunk; part of the recipe, changing it changes every weight


@dataclass(frozen=True)
class Preset:
    """A named config; `describe` is for error messages and docs."""

    name: str
    describe: str
    make_config: Callable[[], PretrainedConfig]


def _tiny_llama() -> PretrainedConfig:
    # GQA (4 query heads share 2 KV heads) so the engine's KV-head handling is exercised by fast tests.
    return LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
    )


def _tiny_gpt2() -> PretrainedConfig:
    return GPT2Config(
        vocab_size=512,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=1024,
        bos_token_id=None,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
    )


def _llama_1b() -> PretrainedConfig:
    # Llama-3.2-1B's shape with a Llama-2-sized vocab: ~1.04B parameters, for GPU benchmarks.
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
    )


def _smollm2_135m() -> PretrainedConfig:
    # SmolLM2-135M's exact architecture (as read from its GGUF), for CPU benchmarks without the wheel.
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny-llama", "2-layer Llama, hidden 64, 4 heads / 2 KV heads, vocab 512", _tiny_llama),
        Preset("tiny-gpt2", "2-layer GPT-2, n_embd 64, 4 heads, vocab 512", _tiny_gpt2),
        Preset("llama-1b", "~1B Llama: 16 layers, hidden 2048, 32/8 heads, vocab 32000", _llama_1b),
        Preset("smollm2-135m", "SmolLM2-135M's shape: 30 layers, 9/3 heads, vocab 49152", _smollm2_135m),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; ModelLoadError listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise ModelLoadError(f"unknown random model preset {name!r}; known presets: {known}") from None


def _chunk_seed(preset: str, param_name: str, chunk: int) -> int:
    # Seeds per (parameter, chunk) make every value independent of construction order, thread count and the
    # other parameters, so the chunks can be filled in parallel.
    digest = hashlib.sha256(f"prefixserve-random:{preset}:{param_name}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _fill_chunk(flat: torch.Tensor, seed: int) -> None:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    flat.uniform_(0.0, 1.0, generator=gen)  # exactly k * 2**-24
    flat.sub_(0.5).mul_(2 * INIT_HALF_RANGE)  # exact: see the module docstring


@torch.no_grad()
def fill_deterministic(model: PreTrainedModel, preset: str) -> None:
    """Overwrite every parameter with exact, seeded values (see the module docstring).

    1-D `...weight` (RMSNorm / LayerNorm scales) are ones and `...bias` are zeros, as a fresh model has them;
    everything else is uniform on [-INIT_HALF_RANGE, INIT_HALF_RANGE), in chunks of FILL_CHUNK elements.
    `uniform_` with a generator is single-threaded, so chunks run on a thread pool (torch releases the GIL):
    the 1B preset takes ~20 s serially on 2 cores, most of it first-touch page faults.
    """
    jobs: list[tuple[torch.Tensor, int]] = []
    for name, param in model.named_parameters():  # tied parameters are listed once
        if name.endswith("bias"):
            param.zero_()
        elif param.ndim == 1:
            param.fill_(1.0)
        else:
            flat = param.detach().view(-1)  # detached: grad mode is per thread, the pool threads have it on
            for i, start in enumerate(range(0, flat.numel(), FILL_CHUNK)):
                jobs.append((flat[start : start + FILL_CHUNK], _chunk_seed(preset, name, i)))
    if len(jobs) <= 1:
        for chunk, seed in jobs:
            _fill_chunk(chunk, seed)
        return
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        list(pool.map(lambda job: _fill_chunk(*job), jobs))


def build_random_model(preset_name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The preset's model (float32, CPU, deterministic weights) and a matching offline byte tokenizer."""
    preset = get_preset(preset_name)
    config = preset.make_config()
    max_positions = int(getattr(config, "max_position_embeddings", None) or config.n_positions)
    tokenizer = build_byte_tokenizer(int(config.vocab_size), max_positions)

    # transformers' own init costs ~35 s for the 1B preset on 2 cores and we overwrite it anyway, so skip it.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, attn_implementation="sdpa", dtype=torch.float32
        )
    model.tie_weights()  # no_init_weights also skips the tying that init_weights does
    fill_deterministic(model, preset.name)
    # A random model may emit either end marker; stopping on both keeps benchmark rows from running forever.
    model.generation_config.eos_token_id = [IM_END_ID, ENDOFTEXT_ID]
    model.generation_config.pad_token_id = PAD_ID
    logger.debug("built random preset %s (%d parameters)", preset.name, model.num_parameters())
    return model, tokenizer
