"""The engine's limits and its admission policy: which ready requests join the running batch this step.

Kept apart from the loop (loop.py) so the policy is one small pure function: first come, first served, while the
batch stays within its row budget and its token budget (a row reserves prefix + prompt + max_tokens KV tokens).
"""

from __future__ import annotations

from collections import deque
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
    running_rows: int = 0
    waiting: int = 0  # submitted, not yet admitted or finished (what `max_waiting` bounds)
    # The most recent decode steps' batch sizes (bounded: a server runs millions of steps).
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=4096))


def admit(
    ready: deque[ActiveRequest], *, rows: int, reserved_tokens: int, limits: EngineLimits
) -> tuple[list[ActiveRequest], list[tuple[ActiveRequest, str]]]:
    """Pop from `ready` the requests that join a batch of `rows` rows reserving `reserved_tokens` tokens.

    Returns (admitted, refused): refused are (request, why) for requests that can never run — prefix + prompt
    leave no position in the model's context (known only once the prefix is resolved), or the request does not
    fit the token budget even in an empty batch; the caller fails them. Stops at the first request that does
    not fit now, so none overtakes an older one.
    """
    admitted: list[ActiveRequest] = []
    refused: list[tuple[ActiveRequest, str]] = []
    tokens = reserved_tokens
    while ready:
        cand = ready[0]
        context = cand.prefix_len + len(cand.request.prompt_ids)
        if context >= limits.max_positions:
            refused.append((ready.popleft(), f"prefix ({cand.prefix_len} virtual tokens) + prompt "
                            f"({len(cand.request.prompt_ids)} tokens) exceed the model's context of "
                            f"{limits.max_positions} positions"))
            continue
        if rows + 1 > limits.max_batch_rows:
            break
        if tokens + cand.budget_tokens > limits.max_batch_tokens:
            if rows == 0 and not admitted:  # can never fit, even alone
                refused.append((ready.popleft(), "prefix + prompt + max_tokens exceed the batch token budget"))
                continue
            break
        ready.popleft()
        admitted.append(cand)
        rows += 1
        tokens += cand.budget_tokens
    return admitted, refused
