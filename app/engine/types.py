"""What goes into the engine (the torch-side request); what comes out is app/engine/protocol.py's."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
from prefix_store.types import PrefixTensors

if TYPE_CHECKING:
    from app.engine.structured import RowGrammar

__all__ = ["EngineError", "EngineOverloaded", "ErrorKind", "FinishReason", "GenerationRequest", "PrefixSource",
           "Priority", "RequestTooLarge", "TokenEvent"]

# A prefix (KV or soft prompt) is given resolved, or as a loader the engine calls on a side thread (cold loads
# never stall a step).
PrefixSource = PrefixTensors | Callable[[], PrefixTensors] | None


@dataclass
class GenerationRequest:
    """One request: prompt tokens, an optional prefix, sampling parameters."""

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prefix: PrefixSource = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Structured outputs: this request's matcher for `sampling.structured`, compiled before submission (the
    # engine client does it off the engine thread: app/engine/structured.py).
    grammar: RowGrammar | None = None
    priority: Priority = "interactive"  # "batch": see EngineClientProtocol.generate
