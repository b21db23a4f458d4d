"""vLLM's per-row logits controls: logit_bias, the min_tokens mask, penalties (repetition, frequency, presence) and
min_p, applied as vLLM's sampler applies them.

Order (vLLM v1): on the model's logits, the end-token mask of `min_tokens` and `logit_bias`, then the penalties;
greedy rows take the argmax of that; sampled rows then divide by their temperature, drop what `min_p` drops, and
go through top-k / top-p (app/engine/sampling.py). Logprobs stay the model's own (vLLM's default, raw logprobs).

Batch invariance: each step changes only a row's own entries, element by element, so a row's result never depends
on its neighbours. Cost: only the rows that ask pay, and sparsely: a penalized row costs the tokens it has seen
(prompt and output), a biased row its biased tokens, never a pass over its whole vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from app.engine.protocol import SamplingParams


@dataclass
class TokenCounts:
    """The distinct tokens a penalized row has seen, on the row's device (capacity fixed at creation).

    ids:    [capacity] token ids; the first `size` are in use
    output: [capacity] float32, how often each was generated (0 for a token seen only in the prompt)
    """

    ids: torch.Tensor
    output: torch.Tensor
    size: int = 0
    index: dict[int, int] = field(default_factory=dict)  # token id -> its slot
    max_id: int = -1

    @classmethod
    def create(cls, prompt_ids: Sequence[int], max_tokens: int, device: torch.device) -> TokenCounts:
        """Counts starting from `prompt_ids` (pass none when only the output counts: frequency/presence)."""
        seen = sorted(set(prompt_ids))
        capacity = len(seen) + max_tokens
        ids = torch.zeros(capacity, dtype=torch.long)
        ids[: len(seen)] = torch.tensor(seen, dtype=torch.long)
        return cls(ids=ids.to(device), output=torch.zeros(capacity, device=device), size=len(seen),
                   index={t: i for i, t in enumerate(seen)}, max_id=seen[-1] if seen else -1)

    def add(self, token_id: int) -> None:
        """Count one generated token."""
        slot = self.index.get(token_id)
        if slot is None:
            if self.size == self.ids.shape[0]:  # more tokens than max_tokens (never in the engine): grow
                self.ids = torch.cat([self.ids, torch.zeros_like(self.ids)])
                self.output = torch.cat([self.output, torch.zeros_like(self.output)])
            slot = self.index[token_id] = self.size
            self.size += 1
            self.max_id = max(self.max_id, token_id)
            self.ids[slot] = token_id
        self.output[slot] += 1


@dataclass(frozen=True)
class LogitBias:
    """A row's logit_bias on its device: ids [K] long (distinct), values [K] float32."""

    ids: torch.Tensor
    values: torch.Tensor
    max_id: int

    @classmethod
    def create(cls, params: SamplingParams, device: torch.device) -> LogitBias | None:
        """None without a logit_bias."""
        if not params.logit_bias:
            return None
        ids, values = zip(*params.logit_bias, strict=True)
        return cls(torch.tensor(ids, dtype=torch.long, device=device),
                   torch.tensor(values, dtype=torch.float32, device=device), max(ids))


class RowControls(Protocol):
    """What the controls read of a row's sampler state (app/engine/sampling.py SamplerState)."""

    params: SamplingParams
    generated: int  # tokens chosen before this step
    end_token_ids: tuple[int, ...]  # what min_tokens forbids
    counts: TokenCounts | None  # when a penalty is on
    bias: LogitBias | None


def _entries(x: torch.Tensor, rows: list[int], ids: list[torch.Tensor], per_row: list[list[float]]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of x [B, V] spread over some rows: `ids[j]` [n_j] are row rows[j]'s columns. Returns their flat
    positions in x.view(-1) [N] (N = sum n_j) and, for each, its row's `per_row[j]` values [N, C]: a handful of
    ops whatever the row count (one gather from a small per-row table), none over the vocabulary."""
    dev = x.device
    sizes = torch.tensor([t.shape[0] for t in ids], device=dev)
    table = torch.tensor([[float(r * x.shape[-1]), *vals] for r, vals in zip(rows, per_row, strict=True)],
                         dtype=torch.float64, device=dev)  # [R, 1 + C]: the row's offset (exact in float64)
    e = table[torch.repeat_interleave(sizes)]  # [N, 1 + C]: each entry's row
    return e[:, 0].long() + torch.cat(ids), e[:, 1:].to(x.dtype)


def _end_token_entries(states: Sequence[RowControls], vocab: int) -> list[tuple[int, int]]:
    """(row, token) pairs that min_tokens forbids this step: a row's end tokens while it is short of min_tokens."""
    return [(i, t) for i, s in enumerate(states) if s.generated < s.params.min_tokens
            for t in s.end_token_ids if t < vocab]


def _add_bias(x: torch.Tensor, states: Sequence[RowControls]) -> None:
    """x [B, V] (contiguous) += each biased row's logit_bias, in place; ids past the logits are skipped."""
    rows = [i for i, s in enumerate(states) if s.bias is not None]
    biases = [b for i in rows if (b := states[i].bias) is not None]
    flat, _ = _entries(x, rows, [b.ids for b in biases], [[] for _ in rows])
    values = torch.cat([b.values for b in biases])  # [N]
    if max(b.max_id for b in biases) >= x.shape[-1]:
        inside = torch.cat([b.ids for b in biases]) < x.shape[-1]
        flat, values = flat[inside], values[inside]
    x.view(-1).index_add_(0, flat, values)  # ids are distinct within a row: each entry gets one addition


def _penalize(x: torch.Tensor, states: Sequence[RowControls]) -> None:
    """Each penalized row's penalties on x [B, V] (contiguous), in place, on the tokens it has seen only:
    repetition (prompt and output tokens: positive logits divided by it, the others multiplied), then
    frequency (times the token's output count) and presence (once if it was generated) subtracted."""
    rows = [i for i, s in enumerate(states) if s.counts is not None]
    counts = [c for i in rows if (c := states[i].counts) is not None]
    per_row = [[states[i].params.repetition_penalty, states[i].params.frequency_penalty,
                states[i].params.presence_penalty] for i in rows]
    flat, p = _entries(x, rows, [c.ids[: c.size] for c in counts], per_row)  # [N], [N, 3]
    output = torch.cat([c.output[: c.size] for c in counts])  # [N]
    if max(c.max_id for c in counts) >= x.shape[-1]:  # a prompt id past the logits (tokenizer > model)
        inside = torch.cat([c.ids[: c.size] for c in counts]) < x.shape[-1]
        flat, p, output = flat[inside], p[inside], output[inside]
    rep, freq, pres = p.unbind(1)
    flat_x = x.view(-1)
    v = flat_x[flat]
    v = torch.where(v > 0, v / rep, v * rep)
    flat_x[flat] = v - freq * output - pres * (output > 0).to(v.dtype)


def apply_controls(logits: torch.Tensor, states: Sequence[RowControls]) -> torch.Tensor:
    """What each row chooses from: logits [B, V] float32 with its min_tokens mask, logit_bias and penalties ->
    [B, V]. A copy when some row asks for any of them (the caller keeps the model's own logits for logprobs),
    else `logits` itself."""
    vocab = logits.shape[-1]
    masked = _end_token_entries(states, vocab)
    biased = any(s.bias is not None for s in states)
    penalized = any(s.counts is not None for s in states)
    if not (masked or biased or penalized):
        return logits
    x = logits.clone(memory_format=torch.contiguous_format)  # flat views below
    if masked:
        rows, cols = zip(*masked, strict=True)
        x[torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)] = float("-inf")
    if biased:
        _add_bias(x, states)
    if penalized:
        _penalize(x, states)
    return x


def record_tokens(states: Sequence[RowControls], token_ids: Sequence[int]) -> None:
    """Count each penalized row's chosen token (after the step)."""
    for s, t in zip(states, token_ids, strict=True):
        if s.counts is not None:
            s.counts.add(t)


def apply_min_p(x: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Drop the tokens whose probability is below min_p times the row's likeliest: x [R, V] logits (temperature
    applied) -> [R, V] with those at -inf. Rows with min_p 0 are left alone.

    In logit space (p_i < min_p * p_max  <=>  x_i - x_max < log(min_p)): the same set as vLLM's softmax form,
    without a softmax, and each row compared with its own maximum only."""
    rows = [i for i, m in enumerate(min_p) if m > 0.0]
    if not rows:
        return x
    log_min_p = torch.tensor([[math.log(min_p[i])] for i in rows], device=x.device)  # [r, 1]
    if len(rows) == x.shape[0]:  # in place: three passes over the logits, no copies
        return x.masked_fill_(x < x.amax(dim=-1, keepdim=True) + log_min_p, float("-inf"))
    idx = torch.tensor(rows, device=x.device)
    sub = x.index_select(0, idx)  # [r, V]
    x.index_copy_(0, idx, sub.masked_fill_(sub < sub.amax(dim=-1, keepdim=True) + log_min_p, float("-inf")))
    return x
