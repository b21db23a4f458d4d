"""Stacked prefixes: several prefix versions in front of one prompt, one after another (docs/prefix-format.md,
"Stacking").

Each part is a block of per-layer keys and values; a stack is their concatenation along the virtual-token axis,
the first part at positions 0..P1-1, the next at P1..P1+P2-1, and the prompt after all of them at P + j
(P = P1 + P2 + ...). Keys are used as stored (never rotated again), so a part's keys are the same wherever it
sits in a stack; what moves is the prompt's positions. The engine takes the stack as one PrefixKV of P virtual
tokens: a row with a stack is laid out, copied and batched exactly as a row with one prefix of P tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prefix_store.types import PrefixKV


def concat_prefixes(parts: Sequence[PrefixKV]) -> PrefixKV:
    """One PrefixKV for a stack: keys and values [L, H_kv, P1 + P2 + ..., D], parts in order.

    A stack of one is that part itself (not a copy): exactly today's single prefix. The parts must agree on
    layers, KV heads, head dim, dtype and device (the resolver gives them all in the served model's)."""
    if not parts:
        raise ValueError("a prefix stack needs at least one part")
    if len(parts) == 1:
        return parts[0]
    first = parts[0].keys
    for i, part in enumerate(parts):
        k = part.keys
        if (k.shape[0], k.shape[1], k.shape[3]) != (first.shape[0], first.shape[1], first.shape[3]) or \
                k.dtype != first.dtype or k.device != first.device:
            raise ValueError(f"stack part {i} has keys {tuple(k.shape)} {k.dtype} on {k.device}; expected "
                             f"[{first.shape[0]}, {first.shape[1]}, P, {first.shape[3]}] {first.dtype} on "
                             f"{first.device} like part 0")
    # One copy of each part into a fresh tensor: the stored parts (the device pool's) are never aliased.
    return PrefixKV(
        keys=torch.cat([p.keys for p in parts], dim=2),
        values=torch.cat([p.values for p in parts], dim=2),
        base_fingerprint=parts[0].base_fingerprint,
        created_by="stack",
    )
