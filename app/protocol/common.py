"""Shared pieces of the OpenAI wire format: the request base config, stop/stream options, usage.

Requests ignore unknown fields (as OpenAI servers do) and are strict about types: `"1"` is not an integer and
`true` is not a number, so a client bug gets a 400 naming the field instead of a silent coercion.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 8  # choices per request; each is its own engine request
MAX_STOP = 4  # stop sequences, as OpenAI


class OpenAIRequest(BaseModel):
    """Base of request bodies: unknown fields ignored, types strict."""

    model_config = ConfigDict(extra="ignore", strict=True)


class OpenAIResponse(BaseModel):
    """Base of response bodies (field order is the wire order)."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(OpenAIRequest):
    include_usage: bool = False


Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)] | None


def normalize_stop(value: str | list[str] | None) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings; raises ValueError (a 400 on `stop`) for an empty one."""
    stops = (value,) if isinstance(value, str) else tuple(value or ())
    if any(not s for s in stops):
        raise ValueError("stop sequences must not be empty")
    return stops


class SamplingFields(OpenAIRequest):
    """The sampling fields completions and chat share."""

    model: str = Field(
        description=(
            "The model to run: the base model's id, a prefix name (`name`, its newest version), one pinned "
            "version (`name@version`, e.g. `poet@2`), or a personal prefix (`user:<external id>`). "
            "See GET /v1/models."
        )
    )
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = None
    user: str | None = None
    # vLLM's length controls (benchmark tools send ignore_eos with max_tokens for fixed output lengths).
    ignore_eos: bool = Field(
        default=False,
        description="Do not end on the model's end-of-sequence token: generate until max_tokens or a stop string.",
    )
    min_tokens: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description=(
            "Generate at least this many tokens: no end-of-sequence token before them, and a stop string ends the "
            "generation only if it ends after them. At most max_tokens (or, with no max_tokens, what fits the "
            "context)."
        ),
    )

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        normalize_stop(v)
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class Usage(OpenAIResponse):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)
