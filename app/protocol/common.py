"""Shared pieces of the OpenAI wire format: the request base config, stop/stream options, sampling fields, usage.

A request field is honoured or refused, never silently dropped: request bodies forbid fields they do not declare
(a 400 "`X` is not supported" naming it, app/errors.py), so supporting a field means declaring it on its model.
They are strict about types too: `"1"` is not an integer and `true` is not a number, so a client bug gets a 400
naming the field instead of a silent coercion.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Engine requests one API request may start (prompts x n, or x best_of): each is a row of the shared batch.
MAX_CHOICES = 64
MAX_STOP = 4  # stop sequences, as OpenAI
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_STOP_TOKEN_IDS = 64
MAX_METADATA = 16  # OpenAI's limit on metadata pairs


class OpenAIRequest(BaseModel):
    """Base of request bodies: undeclared fields are refused (a 400 naming the field), types strict."""

    model_config = ConfigDict(extra="forbid", strict=True)


class OpenAIResponse(BaseModel):
    """Base of response bodies (field order is the wire order)."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(OpenAIRequest):
    include_usage: bool = Field(
        default=False, description="Send a last chunk with the request's usage (and `choices` empty) before [DONE].")
    continuous_usage_stats: bool = Field(
        default=False, description="vLLM's: with include_usage, every chunk also carries its choice's usage so far.")


Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)] | None


def normalize_stop(value: str | list[str] | None) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings; raises ValueError (a 400 on `stop`) for an empty one."""
    stops = (value,) if isinstance(value, str) else tuple(value or ())
    if any(not s for s in stops):
        raise ValueError("stop sequences must not be empty")
    return stops


Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]


class SamplingFields(OpenAIRequest):
    """The sampling fields completions and chat share: OpenAI's, and vLLM's extensions (top_k, min_p,
    repetition_penalty, stop_token_ids, ignore_eos, min_tokens). Every one is honoured per choice, inside a shared
    batch, without changing any other request's tokens."""

    model: str = Field(
        description=(
            "The model to run: the base model's id, a prefix name (`name`, its newest version), one pinned "
            "version (`name@version`, e.g. `poet@2`), or a personal prefix (`user:<external id>`). "
            "See GET /v1/models."
        )
    )
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = Field(
        default=None, description="Sampling temperature (default 1); 0 = greedy (the likeliest token every step).")
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = Field(
        default=None, description="Nucleus sampling: sample among the likeliest tokens that together hold this "
                                  "probability mass (default 1 = all).")
    top_k: Annotated[int, Field(ge=-1)] | None = Field(
        default=None, description="vLLM's: sample among the k likeliest tokens only; 0 or -1 = off (default).")
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = Field(
        default=None, description="vLLM's: drop tokens whose probability (after temperature) is below min_p times "
                                  "the likeliest token's; 0 = off (default).")
    presence_penalty: Penalty | None = Field(
        default=None, description="Subtracted from the logit of every token already generated (-2 to 2, default "
                                  "0); positive values push towards new tokens.")
    frequency_penalty: Penalty | None = Field(
        default=None, description="Subtracted from a token's logit once per time it was already generated (-2 to "
                                  "2, default 0).")
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0, allow_inf_nan=False)] | None = Field(
        default=None, description="vLLM's (HF style): the logits of tokens in the prompt or already generated are "
                                  "divided by it when positive, multiplied when negative; 1 = off (default), > 1 "
                                  "discourages repeats.")
    logit_bias: Annotated[dict[str, Bias], Field(max_length=MAX_LOGIT_BIAS)] | None = Field(
        default=None, description="Token id (as a string key) -> a bias from -100 to 100 added to its logit before "
                                  "sampling; -100 in effect bans a token, 100 forces it. Ids must be in the "
                                  "vocabulary.")
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = Field(
        default=1, description=f"Choices to generate (prompts x n at most {MAX_CHOICES}); choice i samples with "
                               "seed + i.")
    stream: bool = Field(default=False, description="Stream the answer as server-sent events, ending with [DONE].")
    stream_options: StreamOptions | None = Field(default=None, description="With stream: usage reporting.")
    stop: Stop = Field(
        default=None, description=f"Up to {MAX_STOP} strings that end the generation (not included in the text).")
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = \
        Field(default=None, description="vLLM's: token ids that end the generation like the end-of-sequence token "
                                        "(finish_reason `stop`; the token's text is not in the output).")
    seed: int | None = Field(
        default=None, description="Makes sampling reproducible: the same request and seed give the same tokens, "
                                  "alone or in any batch.")
    # Fields that change no output are accepted: `user` (OpenAI's end-user id for abuse monitoring) and `metadata`
    # (tags for a stored completion: OpenAI uses them only with store=true, which is refused below, so accepting
    # them changes nothing a client can observe). `store` itself would promise stored completions: only false.
    user: str | None = Field(default=None, description="Your end user's id; changes nothing in the output.")
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=MAX_METADATA)] | None = \
        Field(default=None, description="Tags (OpenAI's, for stored completions); accepted, changes nothing.")
    store: bool | None = Field(default=None, description="Only false: completions are never stored.")
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

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            parse_logit_bias(v)
        return v

    @field_validator("store")
    @classmethod
    def _store(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("storing completions is not supported (only false)")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's continuous_usage_stats: usage in every chunk (only with include_usage, as vLLM)."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)


def parse_logit_bias(bias: dict[str, float]) -> tuple[tuple[int, float], ...]:
    """logit_bias as (token id, bias) pairs sorted by id; raises ValueError (a 400 on `logit_bias`) for a key that
    is not a non-negative integer, or two keys naming the same id ("1" and "01")."""
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
        if int(key) in out:
            raise ValueError(f"token id {int(key)} appears twice")
        out[int(key)] = value
    return tuple(sorted(out.items()))


class Usage(OpenAIResponse):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)
