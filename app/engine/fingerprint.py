"""The base-model fingerprint that every stored prefix records (docs/prefix-format.md).

A prefix is only meaningful on the exact weights it was trained on, so the fingerprint covers the architecture
and the weights. Hashing every weight of a 1B model would take seconds at each start; instead we hash, per
parameter, its name, its shape and a deterministic strided sample of at most SAMPLE_SIZE values.

Trade-offs (deliberate):
- Sampled, not full: two models that differ only in elements outside every sample get the same fingerprint.
  Real alternatives (another checkpoint, a fine-tune, another quantization) change essentially every element,
  so a few thousand samples per tensor catch them; a hand-edited single weight may go unnoticed.
- Values are rounded to bfloat16 before hashing, so the same weights served in float32 or bfloat16 (CPU
  training, GPU serving) share one fingerprint and a prefix moves between them. A float16 copy may differ:
  float16's rounding and range do not commute with bfloat16's. Changes below bfloat16 precision go unnoticed.
"""

from __future__ import annotations

import hashlib
import json

import torch
from transformers import PretrainedConfig, PreTrainedModel

SAMPLE_SIZE = 4096
FINGERPRINT_VERSION = 1  # bump when the recipe changes: old prefixes then (correctly) no longer match


def architecture(config: PretrainedConfig) -> dict[str, int | str]:
    """The shape facts a prefix depends on; GPT-2's n_layer/n_head/n_embd come through the config aliases."""
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {
        "model_type": str(config.model_type),
        "num_layers": int(config.num_hidden_layers),
        "num_attention_heads": heads,
        "num_kv_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "hidden_size": hidden,
        "vocab_size": int(config.vocab_size),
    }


def sample_indices(numel: int) -> slice:
    """Which flat elements of a tensor of `numel` elements the fingerprint reads: a fixed stride from 0.

    Element 0 is always sampled; tensors of <= SAMPLE_SIZE elements are read whole.
    """
    stride = max(1, -(-numel // SAMPLE_SIZE))  # ceil, so the sample never exceeds SAMPLE_SIZE
    return slice(0, numel, stride)


@torch.no_grad()
def compute_fingerprint(model: PreTrainedModel) -> str:
    """sha256 hex of the architecture plus each parameter's name, shape and sampled values (see module doc).

    The sample is taken on the model's device (only <= SAMPLE_SIZE values per tensor are copied to the CPU),
    then converted float32 -> bfloat16 on the CPU, so the result does not depend on device or serving dtype.
    """
    h = hashlib.sha256()
    header = {"version": FINGERPRINT_VERSION, "arch": architecture(model.config)}
    h.update(json.dumps(header, sort_keys=True).encode())
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        flat = param.detach().reshape(-1)
        sample = flat[sample_indices(flat.numel())].to(device="cpu", dtype=torch.float32)
        h.update(f"\n{name}:{tuple(param.shape)}:".encode())
        h.update(sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()
