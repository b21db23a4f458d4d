"""Token selection: greedy, temperature, top-k, top-p, per-request seeds, and the logprobs of what was chosen.

Every row owns its own `torch.Generator`, seeded from the request, and draws exactly one number per generated
token. A row's sampled tokens therefore depend only on its own logits and seed, never on which other rows share
the batch (the batch-invariance half of DESIGN.md §2 for sampling).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; the message names it."""


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of token selection. temperature 0 = greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None = off; k = also return the k most likely alternatives
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise SamplingParamsError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise SamplingParamsError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SamplingParamsError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingParamsError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise SamplingParamsError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SamplerState:
    """Per-row sampling state that lives as long as the row."""

    params: SamplingParams
    generator: torch.Generator | None = field(default=None)

    @classmethod
    def create(cls, params: SamplingParams, device: torch.device) -> SamplerState:
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=device)
            if params.seed is not None:
                gen.manual_seed(params.seed)
            else:
                gen.seed()
        return cls(params=params, generator=gen)


@dataclass(frozen=True)
class TokenChoice:
    """One selected token, with its logprob and the top alternatives when asked for."""

    token_id: int
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...] = ()


def _filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k and top-p to one row's logits [V] (float32); returns new logits [V]."""
    x = logits / params.temperature
    if params.top_k > 0 and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (the first token always stays).
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def select_tokens(logits: torch.Tensor, states: list[SamplerState]) -> list[TokenChoice]:
    """Choose the next token of every row.

    logits: [B, V] for the last position of each row, any float dtype; states: one per row.
    Greedy rows are an argmax over the whole batch at once; sampled rows draw from their own generator.
    """
    logits = logits.float()
    need_logprobs = any(s.params.logprobs is not None for s in states)
    logp = torch.log_softmax(logits, dim=-1) if need_logprobs else None
    chosen = torch.argmax(logits, dim=-1)  # [B]
    for i, state in enumerate(states):
        if state.params.greedy:
            continue
        probs = torch.softmax(_filtered_logits(logits[i], state.params), dim=-1)
        chosen[i] = torch.multinomial(probs, 1, generator=state.generator)[0]
    ids = chosen.tolist()
    out: list[TokenChoice] = []
    for i, state in enumerate(states):
        k = state.params.logprobs
        if k is None or logp is None:
            out.append(TokenChoice(token_id=ids[i], logprob=None))
            continue
        top: tuple[tuple[int, float], ...] = ()
        if k > 0:
            vals, idx = torch.topk(logp[i], k)
            top = tuple(zip(idx.tolist(), vals.tolist(), strict=True))
        out.append(TokenChoice(token_id=ids[i], logprob=float(logp[i, ids[i]]), top_logprobs=top))
    return out
