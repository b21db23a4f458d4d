"""Grammar masks in token selection: each constrained row's allowed tokens, applied to its own logits only.

Per step (app/engine/sampling.py `select_tokens`): `apply_grammars` asks every constrained row's matcher for its
mask (bits, on the CPU: llguidance computes them there), unpacks the bits and sets the row's disallowed tokens to
-inf in what the row chooses from; after the choice, `advance_grammars` feeds each matcher its row's token.
Unconstrained rows are not touched, so a row's tokens never depend on a neighbour's constraint (the
batch-invariance contract, docs/batching.md). Only constrained rows cost anything: measured at 32 rows on the
embedded model's 49152-token vocabulary, ~1.5-2 ms of masks and 4-16 ms to apply them (bench/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from app.engine.structured import RowGrammar


class ConstrainedRow(Protocol):
    """What the masks read of a row's sampler state (app/engine/sampling.py SamplerState)."""

    grammar: RowGrammar | None


def grammar_bitmask(grammars: Sequence[RowGrammar]) -> torch.Tensor:
    """Every grammar's allowed next tokens as bits: [R, ceil(V_g / 32)] int32 on the CPU (token t: bit t % 32
    of word t // 32), V_g the grammars' vocabulary."""
    words = (grammars[0].vocab_size + 31) // 32
    bitmask = torch.zeros((len(grammars), words), dtype=torch.int32)
    for j, g in enumerate(grammars):
        row = bitmask[j]
        g.fill_mask(row.data_ptr(), words * 4)  # each row's mask is computed from its own matcher only
    return bitmask


def forbidden_tokens(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """The complement of `bitmask` [R, W] int32 as a bool tensor [R, vocab] on `device` (True: not allowed).
    The words' bytes are inverted first (0.2 MB, not 1.5 MB of bools at 32 rows), then unpacked by numpy
    (little-endian bit order matches the int32 words' layout; ~0.2 ms at 32 rows, shifts in torch took 30)."""
    inverted = np.invert(bitmask.numpy().view(np.uint8))  # [R, 4 W]
    bits = np.unpackbits(inverted, axis=1, bitorder="little")[:, :vocab]  # [R, vocab], 1 = forbidden
    return torch.from_numpy(bits.view(np.bool_)).to(device)


def apply_grammars(allowed: torch.Tensor, logits: torch.Tensor, states: Sequence[ConstrainedRow]) -> torch.Tensor:
    """What each row chooses from, with its grammar: allowed [B, V] (the model's logits after the row's other
    controls) -> [B, V], the constrained rows' disallowed tokens at -inf. `logits` [B, V] are the model's own: a
    copy is made rather than changing them (logprobs are read from them), and a row whose other controls leave
    its grammar nothing to choose (min_tokens forbidding the EOS that completes it) is masked from them instead,
    so the grammar always wins."""
    rows = [i for i, s in enumerate(states) if s.grammar is not None]
    if not rows:
        return allowed
    if allowed is logits:
        allowed = logits.clone()
    forbid = forbidden_tokens(grammar_bitmask([g for i in rows if (g := states[i].grammar) is not None]),
                              allowed.shape[-1], allowed.device)  # [R, V]
    idx = torch.tensor(rows, device=allowed.device)
    every = len(rows) == allowed.shape[0]  # then in place: no [R, V] copies
    sub = (allowed if every else allowed.index_select(0, idx)).masked_fill_(forbid, float("-inf"))  # [R, V]
    empty = torch.isneginf(sub).all(dim=-1)  # [R]
    if bool(empty.any()):
        sub[empty] = logits.index_select(0, idx[empty]).masked_fill(forbid[empty], float("-inf"))
    if not every:
        allowed.index_copy_(0, idx, sub)
    return allowed


def advance_grammars(states: Sequence[ConstrainedRow], token_ids: Sequence[int]) -> None:
    """Feed each constrained row's matcher the token it chose this step."""
    for s, t in zip(states, token_ids, strict=True):
        if s.grammar is not None:
            s.grammar.advance(t)
