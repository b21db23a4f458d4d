"""The engine's limits and its admission policy: which ready requests join the running batch this step.

Kept apart from the loop (loop.py) so the policy is one small pure function. Within a priority, first come, first
served, while the batch stays within its row budget and its token budget (a row reserves prefix + prompt +
max_tokens KV tokens). Between priorities (docs/batching.md, "Priorities"):
- every waiting interactive request is considered before any batch request;
- an interactive request that does not fit takes the place of running batch rows when giving those up makes it
  fit (the fewest generated tokens first: the least work to redo); they are preempted, to be restarted;
- batch requests are admitted only when no interactive request is left waiting, into what the others leave free.
So a batch row never keeps an interactive request out of the batch, not even for one step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.engine.rowstate import ActiveRequest


@dataclass(frozen=True)
class EngineLimits:
    max_batch_rows: int = 64
    max_batch_tokens: int = 32768  # sum over rows of prefix + prompt + max_tokens
    max_waiting: int = 1024
    max_positions: int = 8192  # the model's context length
    resolver_threads: int = 4
    # Events waiting for a request's consumer; past this the consumer has stalled and the request is cancelled.
    max_buffered_events: int = 1024
    # A request still queued or running this long after submission ends with an error of kind "timeout".
    request_timeout_s: float | None = None
    # After waking from idle, wait this long for the rest of a burst (a request's n choices, many clients at
    # once) so it is prefilled as one batch instead of the first arrival alone and the rest a step later.
    coalesce_s: float = 0.002


@dataclass
class EngineStats:
    steps: int = 0
    prefills: int = 0
    generated_tokens: int = 0
    preempted: int = 0  # batch rows that gave their place up to an interactive request (and restarted)
    running_rows: int = 0
    waiting: int = 0  # submitted, not yet admitted or finished (what `max_waiting` bounds)
    # The most recent decode steps' batch sizes (bounded: a server runs millions of steps).
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=4096))


@dataclass
class Admission:
    """What one step's admission decided."""

    admitted: list[ActiveRequest] = field(default_factory=list)  # prefill these, in this order
    # Requests that can never run, with why: prefix + prompt leave no position in the model's context (known only
    # once the prefix is resolved), or the request exceeds the token budget even in an empty batch. The caller
    # fails them.
    refused: list[tuple[ActiveRequest, str]] = field(default_factory=list)
    # Running batch rows to take out of the batch and restart, so that admitted interactive requests fit.
    preempted: list[ActiveRequest] = field(default_factory=list)


def admit(ready: deque[ActiveRequest], *, running: Sequence[ActiveRequest], limits: EngineLimits) -> Admission:
    """Decide which of `ready` join a batch whose rows are `running`; the admitted and refused ones are removed
    from `ready` (the others keep their order). Within a priority none overtakes an older one that does not fit.
    """
    out = Admission()
    rows, tokens = len(running), sum(a.budget_tokens for a in running)
    # Batch rows an interactive request may displace: those with the fewest generated tokens first.
    evictable = sorted((a for a in running if a.request.priority == "batch"), key=lambda a: a.completion_tokens)
    interactive = [a for a in ready if a.request.priority != "batch"]
    blocked = False
    for cand in interactive:
        if _refused(cand, limits, out):
            continue
        over_rows, over_tokens = rows + 1 - limits.max_batch_rows, tokens + cand.budget_tokens - limits.max_batch_tokens
        give_up = _rows_to_free(evictable, over_rows, over_tokens)
        if give_up is None:
            blocked = True  # waits for interactive rows to finish; later interactive requests wait behind it
            break
        for a in give_up:
            evictable.remove(a)
            out.preempted.append(a)
            rows, tokens = rows - 1, tokens - a.budget_tokens
        out.admitted.append(cand)
        rows, tokens = rows + 1, tokens + cand.budget_tokens
    if not blocked:
        for cand in (a for a in ready if a.request.priority == "batch"):
            if _refused(cand, limits, out):
                continue
            if rows + 1 > limits.max_batch_rows or tokens + cand.budget_tokens > limits.max_batch_tokens:
                break
            out.admitted.append(cand)
            rows, tokens = rows + 1, tokens + cand.budget_tokens
    gone = {id(a) for a in out.admitted} | {id(a) for a, _ in out.refused}
    kept = [a for a in ready if id(a) not in gone]
    ready.clear()
    ready.extend(kept)
    return out


def _refused(cand: ActiveRequest, limits: EngineLimits, out: Admission) -> bool:
    """Whether `cand` can never run (then it is added to `out.refused`, with why)."""
    context = cand.prefix_len + len(cand.request.prompt_ids)
    if context >= limits.max_positions:
        out.refused.append((cand, f"prefix ({cand.prefix_len} virtual tokens) + prompt "
                                  f"({len(cand.request.prompt_ids)} tokens) exceed the model's context of "
                                  f"{limits.max_positions} positions"))
        return True
    if cand.budget_tokens > limits.max_batch_tokens:
        out.refused.append((cand, "prefix + prompt + max_tokens exceed the batch token budget"))
        return True
    return False


def _rows_to_free(evictable: list[ActiveRequest], over_rows: int, over_tokens: int) -> list[ActiveRequest] | None:
    """The fewest rows from the front of `evictable` whose removal frees `over_rows` rows and `over_tokens`
    tokens ([] when nothing is over); None when even all of them would not."""
    taken: list[ActiveRequest] = []
    for a in evictable:
        if over_rows <= 0 and over_tokens <= 0:
            break
        taken.append(a)
        over_rows, over_tokens = over_rows - 1, over_tokens - a.budget_tokens
    return taken if over_rows <= 0 and over_tokens <= 0 else None
