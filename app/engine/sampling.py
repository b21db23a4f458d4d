"""Token selection: greedy, temperature, min-p, top-k, top-p, per-request seeds, and the logprobs of what was chosen.

Every row owns its own `torch.Generator`, seeded from the request, and draws exactly one number per generated
token. A row's sampled tokens therefore depend only on its own logits and seed, never on which other rows share
the batch (the sampling half of the batch-invariance contract, docs/batching.md).

Length controls, as vLLM: `min_tokens` masks the row's end tokens (the model's EOS ids, whether or not the row
ignores EOS: vLLM masks every "stop token id" of the request) to -inf for its first `min_tokens` tokens, so a row
never ends on EOS before then; its stop strings are handled by the detokenizer (`IncrementalText`). `ignore_eos`
is applied where a row finishes (`ActiveRequest.on_token`): an EOS is then an ordinary token. The request's
`stop_token_ids` end it like EOS and are masked by `min_tokens` too (vLLM's rule).

logit_bias, penalties and min_p are app/engine/logits_processors.py's (applied in vLLM's order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from app.engine.logits_processors import LogitBias, TokenCounts, apply_controls, apply_min_p, record_tokens
from app.engine.protocol import MAX_TOP_LOGPROBS, SamplingParams, SamplingParamsError
from app.engine.structured import RowGrammar
from app.engine.structured_mask import advance_grammars, apply_grammars

__all__ = ["MAX_TOP_LOGPROBS", "SamplerState", "SamplingParams", "SamplingParamsError", "TokenChoice",
           "select_tokens"]

@dataclass
class SamplerState:
    """Per-row sampling state that lives as long as the row.

    end_token_ids: the tokens that `min_tokens` forbids (the model's EOS ids and the request's stop_token_ids);
    generated: tokens chosen so far; counts: the tokens seen, when a penalty is on; bias: logit_bias as tensors.
    """

    params: SamplingParams
    generator: torch.Generator | None = field(default=None)
    end_token_ids: tuple[int, ...] = ()
    generated: int = 0
    grammar: RowGrammar | None = None  # structured outputs: the row's matcher (app/engine/structured.py)
    counts: TokenCounts | None = None
    bias: LogitBias | None = None

    @classmethod
    def create(cls, params: SamplingParams, device: torch.device, end_token_ids: frozenset[int] = frozenset(),
               prompt_ids: list[int] | tuple[int, ...] = ()) -> SamplerState:
        """A row's state; `prompt_ids` feed repetition_penalty (the only control that looks at the prompt)."""
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=device)
            if params.seed is not None:
                gen.manual_seed(params.seed)
            else:
                gen.seed()
        ends = tuple(sorted(end_token_ids | set(params.stop_token_ids))) if params.min_tokens else ()
        counts = None
        if params.penalized:
            seen = prompt_ids if params.repetition_penalty != 1.0 else ()
            counts = TokenCounts.create(seen, params.max_tokens, device)
        return cls(params=params, generator=gen, end_token_ids=ends, counts=counts,
                   bias=LogitBias.create(params, device))


@dataclass(frozen=True)
class TokenChoice:
    """One selected token, with its logprob and the top alternatives when asked for."""

    token_id: int
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...] = ()


# top-p looks at the likeliest tokens first and sorts the whole vocabulary only for the rows whose nucleus is
# wider (measured, 32 rows x 49152: topk 128 ~2 ms, a full sort ~57 ms batched, ~110 ms row by row).
_TOP_P_FIRST_K = 128


def _prefix_sums(x: torch.Tensor) -> torch.Tensor:
    """Running sums along the last axis, as used for probability mass: x [R, V] -> [R, V].

    On a CPU each row is summed in order in float32 whatever the row count (exactly the same alone and batched). On
    CUDA a float32 scan rounds differently for one row than for several (another kernel), which would move a seeded
    row's draw between alone and batched; float64 shrinks that to ~1e-16 (10x slower on a CPU, so not there)."""
    return torch.cumsum(x, dim=-1, dtype=torch.float32 if x.device.type == "cpu" else torch.float64)


def _top_p(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's nucleus: x [R, V] logits, top_p [R] -> logits [R, V] with the rest at -inf.

    A token is dropped when the probability mass strictly before it (likeliest first) already reaches top_p; the
    first token always stays. Exact: a row whose top `_TOP_P_FIRST_K` do not reach top_p is redone on all tokens.
    """
    probs = torch.softmax(x, dim=-1)
    keep = torch.zeros_like(x, dtype=torch.bool)
    todo = torch.arange(x.shape[0], device=x.device)
    k = min(_TOP_P_FIRST_K, x.shape[-1])
    while todo.numel() > 0:
        vals, idx = torch.topk(probs.index_select(0, todo), k, dim=-1)  # [r, k], likeliest first
        mass = _prefix_sums(vals)
        before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=1)  # mass strictly before each
        tp = top_p.index_select(0, todo).unsqueeze(1).to(mass.dtype)  # [r, 1]
        done = (mass[:, -1:] >= tp).squeeze(1) | (k == x.shape[-1])  # the nucleus lies within these k
        rows = todo[done]
        keep[rows] = keep[rows].scatter(1, idx[done], before[done] < tp[done])
        todo, k = todo[~done], x.shape[-1]
    return x.masked_fill(~keep, float("-inf"))


def _filtered_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, min-p, top-k and top-p of each row (vLLM's order): logits [R, V] float32 -> new logits [R, V]."""
    dev, vocab = logits.device, logits.shape[-1]
    x = logits / torch.tensor([p.temperature for p in params], device=dev).unsqueeze(1)
    x = apply_min_p(x, [p.min_p for p in params])
    ks = [p.top_k if p.top_k < vocab else 0 for p in params]
    if any(ks):
        top = torch.topk(x, max(ks), dim=-1).values  # [R, k_max], largest first
        k_t = torch.tensor(ks, device=dev).unsqueeze(1)
        kth = top.gather(1, (k_t - 1).clamp(min=0))  # [R, 1]: each row's k-th largest
        x = x.masked_fill((x < kth) & (k_t > 0), float("-inf"))
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]  # top_p 1 keeps all (no rounding at the tail)
    if nucleus:
        rows = torch.tensor(nucleus, device=dev)
        x[rows] = _top_p(x.index_select(0, rows), torch.tensor([params[i].top_p for i in nucleus], device=dev))
    return x


def _draw(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling from softmax(x): filtered logits x [R, V], one uniform u [R] in [0, 1) per row -> ids [R].
    The CDF is summed by `_prefix_sums`, so a seeded row draws the same token alone and in a batch."""
    probs = torch.softmax(x, dim=-1)
    cdf = _prefix_sums(probs)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    ids = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
    # A draw that rounds past the last positive probability, or a row whose probabilities are not numbers (an inf
    # or NaN logit), takes the row's largest logit instead.
    bad = ~(probs.gather(1, ids.unsqueeze(1)).squeeze(1) > 0)
    if bool(bad.any()):
        ids = torch.where(bad, torch.nan_to_num(x, nan=float("-inf")).argmax(dim=-1), ids)
    return ids


def _rows_of(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] without a copy when `rows` is every row."""
    if len(rows) == x.shape[0]:
        return x
    return x.index_select(0, torch.tensor(rows, device=x.device))


def select_tokens(logits: torch.Tensor, states: list[SamplerState]) -> list[TokenChoice]:
    """Choose the next token of every row.

    logits: [B, V] for the last position of each row, any float dtype; states: one per row (each counts the token
    chosen here). A row still short of its min_tokens cannot choose its end tokens; logit_bias and penalties
    change what the row chooses from (`apply_controls`). Greedy rows are one argmax;
    sampled rows are filtered together and each draws one uniform number from its own generator (inverse CDF), so
    a row's token never depends on its neighbours. Logprobs (of the model's own distribution, before the
    min_tokens mask, bias and penalties, as vLLM's default) and top alternatives are computed for the rows that
    ask, and read back in one transfer.
    """
    logits = logits.float()
    dev = logits.device
    allowed = apply_controls(logits, states)  # [B, V]: what rows choose from; logprobs stay the model's own
    allowed = apply_grammars(allowed, logits, states)  # a constrained row chooses only what its grammar allows
    for s in states:
        s.generated += 1
    sampled = [i for i, s in enumerate(states) if not s.params.greedy]
    # argmax over a 49152-token vocabulary costs ~1 ms per 32 rows on a CPU: skipped when every row samples.
    chosen = (torch.argmax(allowed, dim=-1) if len(sampled) < len(states)
              else torch.zeros(len(states), dtype=torch.long, device=dev))  # [B]
    if sampled:
        x = _filtered_logits(_rows_of(allowed, sampled), [states[i].params for i in sampled])  # [R, V]
        u = torch.cat([torch.rand(1, generator=states[i].generator, device=dev) for i in sampled])
        chosen[torch.tensor(sampled, device=dev)] = _draw(x, u)
    ids = chosen.tolist()
    advance_grammars(states, ids)
    record_tokens(states, ids)
    out = [TokenChoice(token_id=t, logprob=None) for t in ids]
    want = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    if want:
        logp = torch.log_softmax(_rows_of(logits, want), dim=-1)  # [W, V]
        picked = logp.gather(1, _rows_of(chosen.unsqueeze(1), want)).squeeze(1).tolist()
        # Always the same k (not the largest asked in this batch): among tied logprobs, topk's choice depends on k,
        # and a row's alternatives must not depend on its neighbours.
        k_max = min(MAX_TOP_LOGPROBS, logp.shape[-1]) if any(states[i].params.logprobs for i in want) else 0
        top_v, top_i = torch.topk(logp, k_max, dim=-1) if k_max else (logp[:, :0], logp[:, :0].long())
        top_vals, top_ids = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(want):
            k = states[i].params.logprobs or 0
            out[i] = TokenChoice(token_id=ids[i], logprob=picked[j],
                                 top_logprobs=tuple(zip(top_ids[j][:k], top_vals[j][:k], strict=True)))
    return out
