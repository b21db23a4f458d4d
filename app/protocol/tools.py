"""Tool calling in `POST /v1/chat/completions`, OpenAI's shapes: the request's `tools`, `tool_choice` and
`parallel_tool_calls`, the tool calls of an assistant message (sent back in a conversation, and answered), and the
tool-call deltas of a stream. How they are served: app/services/tools.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from app.protocol.common import OpenAIRequest, OpenAIResponse

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(OpenAIRequest):
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="A JSON schema of the arguments (default: any JSON object).")
    strict: bool | None = Field(default=None, description="A forced call's arguments (tool_choice `required` or "
                                                          "named) always follow the schema; `true` with `auto` is a "
                                                          "400, since the model's own call is not constrained.")


class Tool(OpenAIRequest):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIRequest):
    name: str


class NamedToolChoice(OpenAIRequest):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(OpenAIRequest):
    name: str
    arguments: str = Field(description="The arguments as JSON text.")


class ToolCallIn(OpenAIRequest):
    """A tool call of an assistant message the client sends back."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolFields(OpenAIRequest):
    """The chat request's tool fields."""

    tools: Annotated[list[Tool], Field(max_length=128)] | None = Field(
        default=None, description="Functions the model may call, rendered through the model's chat template.")
    tool_choice: ToolChoice | None = Field(
        default=None, description="`none`, `auto` (the default with tools), `required` (at least one call), or "
                                  "one named function; required and named calls follow the tools' schemas.")
    parallel_tool_calls: bool | None = Field(default=None, description="More than one call per turn (default).")


class FunctionCallOut(OpenAIResponse):
    name: str
    arguments: str


class ToolCall(OpenAIResponse):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class DeltaFunctionCall(OpenAIResponse):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


class DeltaToolCall(OpenAIResponse):
    """One call in a stream chunk: its `index` among the choice's calls; id, type and name in its first delta."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}
