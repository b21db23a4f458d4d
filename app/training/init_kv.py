"""Where a new prefix starts: the frozen model's own keys/values of real text.

Li & Liang (2021, §7.2) found that initialising the prefix with activations of real words trains far better
than random values, and it does here: on bench/quality.py's task (SmolLM2-135M, P=16, lr 3e-2, 150 steps),
a prefix drawn from N(0, 1) reached 22% held-out exact match (train loss 0.12), one started from the KV of a
training example's tokens 97% (train loss 0.002). Random N(0, 1) keys and values are nothing like the
per-layer scales of real activations, so the first many steps only undo them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.engine.model import LoadedModel
from app.engine.runner import cache_kwarg_name
from app.jobs.types import TokenizedExample
from app.training.forward import prefix_cache
from prefix_store.types import PrefixKV


def init_token_ids(examples: Sequence[TokenizedExample], num_virtual_tokens: int) -> list[int]:
    """The text a new prefix starts from: the training examples' whole token sequences (prompt and answer), one
    after the other in training-set order, cut to P tokens. A prefix long enough to hold one or more whole
    examples thus starts as a demonstration of the task (what a few-shot prompt would show the model); with
    P at most the first example's length this is the first example's first P tokens, as it always was."""
    ids: list[int] = []
    for ex in examples:
        if len(ids) >= num_virtual_tokens:
            break
        ids.extend(ex.input_ids)
    return ids[:num_virtual_tokens]


def real_token_kv(loaded: LoadedModel, token_ids: Sequence[int], num_virtual_tokens: int,
                  base: PrefixKV | None = None) -> PrefixKV:
    """The model's keys/values [L, H_kv, P, D] (float32, CPU) for `token_ids` cycled or cut to P tokens, computed
    at positions 0..P-1 (the positions a prefix occupies, docs/prefix-format.md).

    Behind a frozen `base` [L, H_kv, Pb, D] (a prefix trained on top of it): the tokens' keys/values with the base
    in front, at positions Pb..Pb+P-1, which is where the new prefix is served in the stack `base+new`; computed
    without the base they would carry the rotary positions and the context of a prefix at the start.
    """
    if not token_ids:
        raise ValueError("real_token_kv needs at least one token id")
    ids = [token_ids[i % len(token_ids)] for i in range(num_virtual_tokens)]
    cache_kw = cache_kwarg_name(loaded.model)
    pb = base.num_virtual_tokens if base is not None else 0
    behind: dict[str, object] = {}
    if base is not None:
        behind = {cache_kw: prefix_cache(base.keys.to(loaded.device), base.values.to(loaded.device), 1, loaded.dtype),
                  "attention_mask": torch.ones((1, pb + num_virtual_tokens), dtype=torch.long, device=loaded.device),
                  "position_ids": torch.arange(pb, pb + num_virtual_tokens, device=loaded.device).unsqueeze(0)}
    with torch.no_grad():
        out = loaded.model(
            input_ids=torch.tensor([ids], device=loaded.device), use_cache=True, logits_to_keep=1, **behind,
        )
    cache = getattr(out, cache_kw, None) or out.past_key_values
    keys = torch.stack([layer.keys[0, :, pb:] for layer in cache.layers]).float().cpu()  # [L, H_kv, P, D]
    values = torch.stack([layer.values[0, :, pb:] for layer in cache.layers]).float().cpu()
    return PrefixKV(keys, values, base_fingerprint=loaded.spec.fingerprint, created_by="init:real_tokens")
