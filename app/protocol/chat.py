"""`POST /v1/chat/completions` request and response bodies (OpenAI field names and order). Text only."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, ValidationInfo, field_validator, model_serializer

from app.protocol.common import OpenAIRequest, OpenAIResponse, SamplingFields, Usage
from app.protocol.stacking import StackFields
from app.protocol.structured import StructuredFields
from app.protocol.tools import DeltaToolCall, ToolCall, ToolCallIn, ToolFields

MAX_TOP_LOGPROBS = 20

FinishReason = Literal["stop", "length", "tool_calls"]


class TextPart(OpenAIRequest):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIRequest):
    """One message. `developer` is treated as `system` (chat templates do not know it)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant turn's calls, sent back in the conversation
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = Field(default=None, description="The participant's name, handed to the chat template "
                                                       "(as vLLM does; templates that know no names leave it out).")

    def template_dict(self) -> dict[str, str]:
        """The message as the tokenizer's chat template expects it."""
        content = self.content
        text = "".join(p.text for p in content) if isinstance(content, list) else content or ""
        out = {"role": "system" if self.role == "developer" else self.role, "content": text}
        return out | ({"name": self.name} if self.name is not None else {})

    def template_message(self) -> dict[str, Any]:
        """`template_dict` with the tool calls and the answered call's id (app/engine/tool_template.py renders
        them for the chat template)."""
        out: dict[str, Any] = dict(self.template_dict())
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatCompletionRequest(SamplingFields, StructuredFields, ToolFields, StackFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        description="The conversation, rendered with the model's chat template.")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Deprecated name of max_completion_tokens.")
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Most tokens to generate per choice (default: as many as fit the context).")
    logprobs: bool = Field(default=False, description="Return each generated token's logprob (the model's own "
                                                      "distribution).")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        default=None, description=f"With logprobs: also this many likeliest alternatives per token "
                                  f"(0 to {MAX_TOP_LOGPROBS}).")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return v

    @property
    def completion_limit(self) -> int | None:
        """`max_completion_tokens` (the current name) wins over the deprecated `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TopLogprob(OpenAIResponse):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(OpenAIResponse):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(OpenAIResponse):
    content: list[TokenLogprob] | None


class AssistantMessage(OpenAIResponse):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None  # left out when the turn made no calls

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return data if data.get("tool_calls") is not None else {k: v for k, v in data.items() if k != "tool_calls"}


class ChatChoice(OpenAIResponse):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletion(OpenAIResponse):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class Delta(OpenAIResponse):
    """A stream chunk's message delta; unset fields are left out, as OpenAI sends them."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


class ChunkChoice(OpenAIResponse):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(OpenAIResponse):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None
