"""What goes into the engine and what comes out of it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from app.engine.sampling import SamplingParams
from prefix_store.types import PrefixKV

FinishReason = Literal["stop", "length", "cancelled", "error"]
# Why a request ended in "error": the API maps these to statuses without reading messages.
ErrorKind = Literal["prefix_unavailable", "too_large", "timeout", "internal"]

# A prefix is given resolved, or as a loader the engine calls on a side thread (cold loads never stall a step).
PrefixSource = PrefixKV | Callable[[], PrefixKV] | None


class EngineError(Exception):
    """Base of the engine's errors."""


class EngineOverloaded(EngineError):
    """The waiting queue is full; the caller should retry later."""


class RequestTooLarge(EngineError):
    """A request can never fit the batch token budget."""


@dataclass
class GenerationRequest:
    """One request: prompt tokens, an optional prefix, sampling parameters."""

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prefix: PrefixSource = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (or the final event). `text` is the newly final text, possibly empty."""

    request_id: str
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_kind: ErrorKind | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None
