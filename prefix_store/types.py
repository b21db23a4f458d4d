"""Value types shared by the codec, the tiers and the engine.

A prefix is, for each layer l, a key K_l and a value V_l of shape [num_kv_heads, P, head_dim]
(docs/prefix-format.md).
We keep all layers stacked: keys/values are [num_layers, num_kv_heads, P, head_dim].

A soft prompt (PEFT's PROMPT_TUNING and P_TUNING) is the other kind of virtual tokens: learned input embeddings
[P, hidden] that go through the model in front of the prompt (docs/prefix-format.md, "Soft prompts").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prefix_store.kinds import PREFIX_KINDS as PREFIX_KINDS
from prefix_store.kinds import SOFT_PROMPT_KINDS as SOFT_PROMPT_KINDS
from prefix_store.kinds import PrefixKind as PrefixKind


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
    hidden_size: int = 0  # width of the input embeddings (a soft prompt's rows); 0: unknown, soft prompts refused

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


@dataclass(frozen=True)
class SoftPrompt:
    """A decoded soft prompt: learned input embeddings that sit at positions 0..P-1, in front of the prompt.

    embeddings: [P, hidden]. `kind` is "prompt_tuning" or "p_tuning" (PEFT's method it came from; both serve the
    same way: P_TUNING's prompt encoder was run once when it was imported). Like PrefixKV, never handed to the
    model as is: the engine copies it into the batch's input embeddings.
    """

    embeddings: torch.Tensor
    kind: PrefixKind = "prompt_tuning"
    base_fingerprint: str | None = None
    created_by: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.embeddings.numel() * self.embeddings.element_size())


# What a stored prefix version decodes to.
PrefixTensors = PrefixKV | SoftPrompt
