"""`POST /v1/completions` request and response bodies (OpenAI field names and order)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from app.protocol.common import MAX_CHOICES, OpenAIResponse, SamplingFields, Usage
from app.protocol.stacking import StackFields
from app.protocol.structured import StructuredFields

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions endpoint

Prompt = str | list[int] | list[str] | list[list[int]]
FinishReason = Literal["stop", "length"]


class CompletionRequest(SamplingFields, StructuredFields, StackFields):
    """A completion request: one prompt (a string, or token ids) or several (a list of strings, or of token-id
    lists), each answered with n choices: choice `index` = prompt index * n + j, as OpenAI numbers them."""

    prompt: Prompt = Field(description=(
        "A string, token ids, or several prompts (a list of strings or of token-id lists): each gets n choices, "
        f"numbered prompt index * n + j; prompts x n (or x best_of) at most {MAX_CHOICES}."))
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=16, description="Most tokens to generate per choice (default 16; null = as many as fit).")
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = Field(
        default=None, description=f"Return each generated token's logprob and this many likeliest alternatives "
                                  f"(0 to {MAX_COMPLETION_LOGPROBS}); the model's own distribution.")
    echo: bool = Field(default=False, description="Put the prompt's text before each choice's text "
                                                  "(not with logprobs: the prompt's logprobs are not computed).")
    best_of: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = Field(
        default=None, description="Generate this many candidates per prompt (at least n) and return the n with the "
                                  "highest mean token logprob; not with stream.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Prompt) -> Prompt:
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("logprobs") is not None:
            raise ValueError("echo with logprobs is not supported (the prompt's logprobs are not computed)")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if v is not None and v < n:
            raise ValueError(f"best_of must be at least n={n}, got {v}")
        if v is not None and v > n and info.data.get("stream"):
            raise ValueError("best_of above n cannot be streamed (the best are known only at the end)")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or token ids."""
        v = self.prompt
        if isinstance(v, str):
            return [v]
        if all(isinstance(x, int) for x in v):
            return [[int(x) for x in v]]  # type: ignore[arg-type]
        return list(v)  # type: ignore[arg-type]

    @property
    def candidates(self) -> int:
        """Engine requests per prompt: best_of, or n."""
        return self.best_of or self.n


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
