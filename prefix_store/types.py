"""Value types shared by the codec, the tiers and the engine.

A prefix is, for each layer l, a key K_l and a value V_l of shape [num_kv_heads, P, head_dim]
(docs/prefix-format.md).
We keep all layers stacked: keys/values are [num_layers, num_kv_heads, P, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class PrefixError(ValueError):
    """A prefix (file, shape, dtype, values) is invalid or does not fit the served base model.

    The message says what was expected and what was found; the API turns it into a 4xx.
    """


@dataclass(frozen=True)
class ModelSpec:
    """The facts about the frozen base model that a prefix must match."""

    model_id: str
    fingerprint: str  # stable hash of architecture + weights
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name the model computes in, e.g. "float32", "bfloat16"

    @property
    def token_dim(self) -> int:
        """PEFT's `token_dim` = kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    def prefix_bytes(self, num_virtual_tokens: int, itemsize: int = 4) -> int:
        """Bytes of one prefix of P virtual tokens (keys + values, all layers)."""
        return 2 * self.num_layers * self.num_kv_heads * num_virtual_tokens * self.head_dim * itemsize


@dataclass(frozen=True)
class PrefixKV:
    """A decoded prefix.

    keys, values: [num_layers, num_kv_heads, P, head_dim]. Never hand these tensors to a model cache directly:
    transformers caches grow in place, so the engine copies them into a fresh cache per batch.
    """

    keys: torch.Tensor
    values: torch.Tensor
    base_fingerprint: str | None = None  # None for a PEFT import (it records only a model name)
    created_by: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.keys.shape[2])

    @property
    def num_layers(self) -> int:
        return int(self.keys.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size())
