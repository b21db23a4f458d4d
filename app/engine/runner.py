"""Forward steps of the frozen model over a batch (no asyncio, no scheduling: that is loop.py's job)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from app.engine.batch import Batch, KVGeometry
from app.engine.quantized_decoder import QuantizedDecoder


def cache_kwarg_name(model: torch.nn.Module) -> str:
    """The name the model's forward uses for its KV cache.

    transformers renamed `past_key_values` to `cache` during the 5.x series; passing the wrong name is
    silently swallowed by **kwargs (the prefix would be ignored), so we look it up once.
    """
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`")


def geometry_of(model: Any, device: torch.device, dtype: torch.dtype) -> KVGeometry:
    """KV cache shape facts from a transformers config (Llama family or GPT-2)."""
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    return KVGeometry(num_layers=layers, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, device=device)


# cuDNN attention (preferred by PyTorch on Hopper) builds an execution plan per new sequence length; the cache
# grows by one column every decode step, so it re-plans every step of every layer (measured on an H100: 3 ms per
# attention call, a 1B model's 64-row decode step at 80-90 ms). The other kernels take any length.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ModelRunner:
    """Runs the model's forward for a batch and returns the last position's logits.

    `serving`: a forward of the same model on a quantized serving copy of its weights
    (app/engine/quantized_decoder.py), used instead of transformers' forward; None: the model's own forward.
    """

    def __init__(self, model: torch.nn.Module, serving: QuantizedDecoder | None = None) -> None:
        self.model = model
        self.serving = serving
        self._cache_kw = cache_kwarg_name(model)

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """One forward over `batch.input_ids` [B, Q]; appends Q tokens to the cache; returns logits [B, V].

        Prompts are left-padded, so the last column is every row's newest real token. A prefill with soft-prompt
        rows goes in as input embeddings: the ids' own embeddings with the soft prompts' columns swapped in.
        """
        with sdpa_kernel(_SDPA_BACKENDS):
            if self.serving is not None:
                return self.serving.forward(batch.input_ids, batch.position_ids, batch.attention_mask, batch.cache,
                                            soft=batch.soft)
            inputs: dict[str, torch.Tensor] = {"input_ids": batch.input_ids}
            if batch.soft is not None:
                embed = self.model.get_input_embeddings()  # type: ignore[operator]  # untyped in transformers
                inputs = {"inputs_embeds": batch.soft.apply(embed(batch.input_ids))}
            out = self.model(
                **inputs,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: batch.cache},
            )
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits
