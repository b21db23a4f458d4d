"""The training forward: the prefix as the model's KV cache, served positions, LM head only where it counts.

Rows are right-padded (training needs no generation, and right padding keeps every row's real tokens at the same
columns). Along the KV axis row i is `[prefix (P) | tokens_i | pad]`; the served position convention holds
(docs/prefix-format.md):
the prefix occupies positions 0..P-1 and real token j sits at position P+j, so a prefix trained here gives the
same logits in the engine (left-padded, explicit position_ids) and in HF PEFT (no padding).

On top of a frozen base (a prefix or a stack of them, docs/prefix-format.md "Stacking"): the base's keys and
values go in front of the trained prefix's, `[base (Pb) | prefix (P) | tokens_i | pad]`, and the batch is
collated for Pb + P virtual tokens, exactly as the stack `base+new` is served; only the prefix takes gradients.

Speed (docs/training.md): the decoder body produces hidden states [B, S, hidden]; the LM head (the biggest matmul
of a small model, hidden x vocab) runs only on the N hidden states that predict a target token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from app.engine.runner import cache_kwarg_name
from app.jobs.types import TokenizedExample
from prefix_store.types import PrefixKV


@dataclass(frozen=True)
class TrainBatch:
    """Padded tensors for one forward, plus where the targets are.

    input_ids:      [B, S]      right-padded with the pad token
    position_ids:   [B, S]      P + j for column j (pads get positions too; they are masked as keys)
    attention_mask: [B, P + S]  1 on the prefix and real tokens, 0 on pads
    rows, cols:     [N]         the hidden state at (row, col) predicts token (row, col + 1), a target
    labels:         [N]         those target token ids
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    labels: torch.Tensor
    real_tokens: int  # non-pad tokens in the batch (prompt + completion)

    @property
    def num_targets(self) -> int:
        return int(self.labels.shape[0])


def collate(
    examples: Sequence[TokenizedExample], *, num_virtual_tokens: int, pad_token_id: int, device: torch.device
) -> TrainBatch:
    """Right-pad `examples` into one TrainBatch for a P-token prefix.

    A target at column 0 has no real token before it to predict it from (the prefix holds keys only, no query),
    so it is dropped, as in PEFT and every causal-LM loss.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    p = num_virtual_tokens
    b, s = len(examples), max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((b, s), pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, p + s), dtype=torch.long)
    mask[:, :p] = 1
    rows: list[int] = []
    cols: list[int] = []
    labels: list[int] = []
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[i, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        mask[i, p : p + n] = 1
        for j in range(1, n):
            if ex.loss_mask[j]:
                rows.append(i)
                cols.append(j - 1)
                labels.append(ex.input_ids[j])
    position_ids = torch.arange(p, p + s, dtype=torch.long).expand(b, s)

    def dev(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return TrainBatch(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        attention_mask=mask.to(device),
        rows=dev(rows),
        cols=dev(cols),
        labels=dev(labels),
        real_tokens=sum(len(ex.input_ids) for ex in examples),
    )


def behind(base: PrefixKV | None, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model attends to: the frozen base's keys/values [L, H_kv, Pb, D] in front of the trained
    prefix's [L, H_kv, P, D] -> [L, H_kv, Pb + P, D] (as the served stack concatenates them); no base: the
    prefix alone. The base is detached: no gradient ever reaches it."""
    if base is None:
        return keys, values
    return (torch.cat([base.keys.detach().to(keys.dtype), keys], dim=2),
            torch.cat([base.values.detach().to(values.dtype), values], dim=2))


def prefix_cache(keys: torch.Tensor, values: torch.Tensor, batch_size: int, dtype: torch.dtype) -> DynamicCache:
    """A fresh DynamicCache holding the prefix for every row, differentiable w.r.t. keys/values.

    keys, values: [L, H_kv, P, D] -> per layer [B, H_kv, P, D] (an expand: the backward sums over rows). The cache
    copies on its first update and the model concatenates onto that copy, so the caller's tensors are never
    modified (PEFT 0.21 builds its training cache the same way).
    """
    layers = [
        (
            k.to(dtype).unsqueeze(0).expand(batch_size, -1, -1, -1),
            v.to(dtype).unsqueeze(0).expand(batch_size, -1, -1, -1),
        )
        for k, v in zip(keys.unbind(0), values.unbind(0), strict=True)
    ]
    return DynamicCache(layers)


class PrefixForward:
    """The frozen model split into decoder body and LM head, so logits are computed only at target positions.

    Works for the families the engine serves (Llama-like and GPT-2): `base_model` is the decoder (final norm
    included) and `get_output_embeddings()` the LM head, with no logit post-processing in between.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        body = getattr(model, "base_model", None)
        head = model.get_output_embeddings()  # type: ignore[no-untyped-call]  # untyped in transformers
        if not isinstance(body, torch.nn.Module) or body is model or not isinstance(head, torch.nn.Module):
            raise TypeError(f"{type(model).__name__} has no separate decoder body and LM head")
        self.body = body
        self.head = head
        self.dtype = next(model.parameters()).dtype
        self._cache_kw = cache_kwarg_name(body)

    def hidden_states(self, keys: torch.Tensor, values: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        """Final hidden states [B, S, hidden] of `batch` behind the prefix keys/values [L, H_kv, P, D]."""
        cache = prefix_cache(keys, values, int(batch.input_ids.shape[0]), self.dtype)
        out = self.body(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=True,  # the cache is how the prefix gets in; it is thrown away afterwards
            **{self._cache_kw: cache},
        )
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    def target_logits(self, keys: torch.Tensor, values: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        """Float32 logits [N, V] of the hidden states that predict the batch's N targets."""
        hidden = self.hidden_states(keys, values, batch)[batch.rows, batch.cols]  # [N, hidden]
        logits: torch.Tensor = self.head(hidden)
        return logits.float()

    def loss_sum(self, keys: torch.Tensor, values: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        """Summed cross-entropy (a scalar) over the batch's targets; divide by `num_targets` for the mean."""
        logits = self.target_logits(keys, values, batch)
        return torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum")
