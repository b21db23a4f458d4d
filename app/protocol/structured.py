"""Structured-output request fields, in completions and chat: OpenAI's `response_format` and vLLM's
`structured_outputs` (with its older spelling, the `guided_*` fields).

Only the shape is checked here; app/services/structured.py turns what a request asks into the engine's one
constraint (at most one per request), and the engine compiles it: a schema, regex or grammar it cannot compile
is a 400 naming the field it came from.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from app.protocol.common import OpenAIRequest

JsonSchemaBody = dict[str, Any] | bool


class ResponseFormatText(OpenAIRequest):
    type: Literal["text"]


class ResponseFormatJsonObject(OpenAIRequest):
    type: Literal["json_object"]


class JsonSchemaSpec(OpenAIRequest):
    """OpenAI's `json_schema`: the schema is always enforced, `strict` or not."""

    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: JsonSchemaBody = Field(alias="schema")
    strict: bool | None = None


class ResponseFormatJsonSchema(OpenAIRequest):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
                           Field(discriminator="type")]


class StructuredOutputsParams(OpenAIRequest):
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar, json_object."""

    json_: JsonSchemaBody | str | None = Field(default=None, alias="json",
                                               description="A JSON schema (an object, or its JSON text).")
    regex: str | None = Field(default=None, description="The whole output matches this regular expression.")
    choice: Annotated[list[str], Field(min_length=1)] | None = Field(
        default=None, description="The output is exactly one of these strings.")
    grammar: str | None = Field(default=None, description="A context-free grammar, in Lark or GBNF (EBNF) syntax.")
    json_object: bool | None = Field(default=None, description="Any JSON object.")
    disable_any_whitespace: bool = Field(default=False, description="JSON without any whitespace.")
    whitespace_pattern: str | None = Field(
        default=None, description="A regex for the whitespace allowed between JSON tokens.")
    # vLLM's, refused with a 400 when set (a request field is honoured or refused, never ignored):
    disable_additional_properties: bool = False
    structural_tag: str | None = None


class StructuredFields(OpenAIRequest):
    """The structured-output fields completions and chat share (at most one of them per request)."""

    response_format: ResponseFormat | None = Field(
        default=None, description="`text` (no constraint), `json_object` or `json_schema` (always enforced).")
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: JsonSchemaBody | str | None = Field(
        default=None, description="vLLM's older `structured_outputs.json`.")
    guided_regex: str | None = Field(default=None, description="vLLM's older `structured_outputs.regex`.")
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = Field(
        default=None, description="vLLM's older `structured_outputs.choice`.")
    guided_grammar: str | None = Field(default=None, description="vLLM's older `structured_outputs.grammar`.")
    guided_whitespace_pattern: str | None = Field(
        default=None, description="vLLM's older `structured_outputs.whitespace_pattern` (with guided_json).")
