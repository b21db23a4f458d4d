"""Soft prompts in a batch: learned input embeddings that replace the token embeddings of some prefill columns.

A soft-prompt row (PEFT PROMPT_TUNING / P_TUNING, docs/prefix-format.md "Soft prompts") has no KV prefix; its
P learned embeddings go through the model as the first P inputs of its prefill, at positions 0..P-1, and its
prompt follows at P + j. In the batch (app/engine/batch.py) they are ordinary query columns:

    [pad | soft_i | prompt_i]     Q = max over rows of (V_i + S_i) columns, left-padded

The batch keeps token ids for every column (the pad token at a soft prompt's columns) and `SoftInputs` says which
columns take a learned embedding instead. The runner embeds the ids as the model would and swaps those columns in
(`torch.where`, an exact select), so a row without a soft prompt gets bit for bit the embeddings the model computes
from its ids, and a soft-prompt row the same embeddings alone as in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prefix_store.types import PrefixTensors, SoftPrompt


@dataclass(frozen=True)
class SoftInputs:
    """The learned embeddings of a prefill's soft-prompt rows.

    embeddings: [B, Q, hidden]  a soft prompt's rows at its columns, zeros elsewhere
    slots:      [B, Q, 1]       True at a soft prompt's columns
    """

    embeddings: torch.Tensor
    slots: torch.Tensor

    def apply(self, token_embeddings: torch.Tensor) -> torch.Tensor:
        """token_embeddings [B, Q, hidden] (the model's embedding of the batch's ids) with the soft prompts' columns
        replaced -> [B, Q, hidden], in the token embeddings' dtype."""
        return torch.where(self.slots, self.embeddings.to(token_embeddings.dtype), token_embeddings)


def soft_len(prefix: PrefixTensors | None) -> int:
    """V_i: the learned input embeddings a row's prefill starts with (0 for a KV prefix or none)."""
    return prefix.num_virtual_tokens if isinstance(prefix, SoftPrompt) else 0


def stage_soft_prompts(
    prefixes: Sequence[PrefixTensors | None], prompt_lens: Sequence[int], q_len: int, device: torch.device
) -> SoftInputs | None:
    """The SoftInputs of a prefill whose rows are left-padded to `q_len` columns (row i: V_i soft columns, then
    its S_i prompt tokens, right-aligned); None when no row has a soft prompt."""
    soft = [(i, p) for i, p in enumerate(prefixes) if isinstance(p, SoftPrompt)]
    if not soft:
        return None
    first = soft[0][1].embeddings
    embeddings = torch.zeros((len(prefixes), q_len, first.shape[1]), dtype=first.dtype, device=device)
    slots = torch.zeros((len(prefixes), q_len, 1), dtype=torch.bool, device=device)
    for i, prompt in soft:
        v, end = prompt.num_virtual_tokens, q_len - prompt_lens[i]
        embeddings[i, end - v : end] = prompt.embeddings  # [V_i, hidden], just before the prompt's columns
        slots[i, end - v : end] = True
    return SoftInputs(embeddings, slots)
