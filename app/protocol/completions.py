"""`POST /v1/completions` request and response bodies (OpenAI field names and order)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from app.protocol.common import OpenAIResponse, SamplingFields, Usage
from app.protocol.structured import StructuredFields

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions endpoint

Prompt = str | list[int] | list[str] | list[list[int]]
FinishReason = Literal["stop", "length"]


class CompletionRequest(SamplingFields, StructuredFields):
    """A completion request. `prompt` is a string or token ids; a list of several prompts is refused."""

    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Prompt) -> str | list[int]:
        if isinstance(v, str):
            return v
        if not v:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in v):
            return [int(x) for x in v]  # type: ignore[arg-type]
        if len(v) != 1:
            raise ValueError("batched prompts are not supported: send one prompt per request")
        one = v[0]
        if isinstance(one, str):
            return one
        if isinstance(one, list):
            return one
        raise ValueError("prompt must be a string, a list of one string, or token ids")


class CompletionLogprobs(OpenAIResponse):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(OpenAIResponse):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(OpenAIResponse):
    """A completion response, and (with object `text_completion` too, as OpenAI) a stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None
