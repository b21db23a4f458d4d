"""What goes into the engine (the torch-side request); what comes out is app/engine/protocol.py's."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from app.engine.protocol import (
    EngineError,
    EngineOverloaded,
    ErrorKind,
    FinishReason,
    Priority,
    RequestTooLarge,
    SamplingParams,
    TokenEvent,
)
from prefix_store.types import PrefixKV

__all__ = ["EngineError", "EngineOverloaded", "ErrorKind", "FinishReason", "GenerationRequest", "PrefixSource",
           "Priority", "RequestTooLarge", "TokenEvent"]

# A prefix is given resolved, or as a loader the engine calls on a side thread (cold loads never stall a step).
PrefixSource = PrefixKV | Callable[[], PrefixKV] | None


@dataclass
class GenerationRequest:
    """One request: prompt tokens, an optional prefix, sampling parameters."""

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prefix: PrefixSource = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    priority: Priority = "interactive"  # "batch": see EngineClientProtocol.generate
