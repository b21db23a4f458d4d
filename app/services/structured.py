"""What a request's structured-output fields ask, as the engine's one constraint (app/engine/protocol.py
`StructuredOutput`), normalized so that equal constraints share one compiled grammar.

Torch-free: the engine compiles the constraint (app/engine/structured.py) and a spec it cannot compile comes back
as a StructuredOutputError naming the field, which the serving core answers with a 400 (app/services/generation.py).
"""

from __future__ import annotations

import json
from typing import Any

from app.engine.protocol import StructuredOutput
from app.errors import InvalidRequest
from app.protocol.structured import ResponseFormatJsonObject, ResponseFormatJsonSchema, StructuredFields

ANY_OBJECT = '{"type":"object"}'


def _schema_text(schema: Any, param: str) -> str:
    """A JSON schema (an object or a boolean, or its JSON text) as compact JSON. Its key order is kept: the
    grammar generates required properties in the order the schema lists them (as OpenAI's structured outputs)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{param} must be a JSON schema; its text is not JSON: {exc}", param=param) from None
    if not isinstance(schema, dict | bool):
        raise InvalidRequest(f"{param} must be a JSON schema (an object), got {type(schema).__name__}", param=param)
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def _whitespace(disable: bool, pattern: str | None, param: str) -> str | None:
    if disable and pattern is not None:
        raise InvalidRequest(f"{param}: disable_any_whitespace and whitespace_pattern exclude each other",
                             param=param)
    return "" if disable else pattern


def _from_structured_outputs(req: StructuredFields) -> StructuredOutput | None:
    so, param = req.structured_outputs, "structured_outputs"
    if so is None:
        return None
    if so.structural_tag is not None or so.disable_additional_properties:
        name = "structural_tag" if so.structural_tag is not None else "disable_additional_properties"
        raise InvalidRequest(f"{param}.{name} is not supported", param=param)
    asked = [k for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                            ("grammar", so.grammar), ("json_object", so.json_object)) if v is not None]
    if len(asked) != 1:
        raise InvalidRequest(f"{param} takes exactly one of json, regex, choice, grammar, json_object; got "
                             f"{', '.join(asked) or 'none'}", param=param)
    whitespace = _whitespace(so.disable_any_whitespace, so.whitespace_pattern, param)
    if whitespace is not None and asked[0] not in ("json", "json_object"):
        raise InvalidRequest(f"{param}: the whitespace options apply to json and json_object only", param=param)
    if so.json_ is not None:
        return StructuredOutput("json_schema", _schema_text(so.json_, param), whitespace, param=param)
    if so.json_object is not None:
        if not so.json_object:
            raise InvalidRequest(f"{param}.json_object must be true when given", param=param)
        return StructuredOutput("json_schema", ANY_OBJECT, whitespace, param=param)
    if so.regex is not None:
        return StructuredOutput("regex", so.regex, param=param)
    if so.choice is not None:
        return StructuredOutput("choice", json.dumps(so.choice, ensure_ascii=False), param=param)
    assert so.grammar is not None
    return StructuredOutput("grammar", so.grammar, param=param)


def _from_guided(req: StructuredFields) -> list[StructuredOutput]:
    """vLLM's older fields, each its own constraint."""
    found = []
    if req.guided_json is not None:
        found.append(StructuredOutput("json_schema", _schema_text(req.guided_json, "guided_json"),
                                      req.guided_whitespace_pattern, param="guided_json"))
    elif req.guided_whitespace_pattern is not None:
        raise InvalidRequest("guided_whitespace_pattern applies to guided_json only",
                             param="guided_whitespace_pattern")
    if req.guided_regex is not None:
        found.append(StructuredOutput("regex", req.guided_regex, param="guided_regex"))
    if req.guided_choice is not None:
        found.append(StructuredOutput("choice", json.dumps(req.guided_choice, ensure_ascii=False),
                                      param="guided_choice"))
    if req.guided_grammar is not None:
        found.append(StructuredOutput("grammar", req.guided_grammar, param="guided_grammar"))
    return found


def structured_output(req: StructuredFields) -> StructuredOutput | None:
    """The one constraint the request asks for (None: free text); a 400 when it asks for more than one."""
    found: list[StructuredOutput] = []
    rf = req.response_format
    if isinstance(rf, ResponseFormatJsonObject):
        found.append(StructuredOutput("json_schema", ANY_OBJECT, param="response_format"))
    elif isinstance(rf, ResponseFormatJsonSchema):
        found.append(StructuredOutput("json_schema", _schema_text(rf.json_schema.schema_, "response_format"),
                                      param="response_format"))
    if (so := _from_structured_outputs(req)) is not None:
        found.append(so)
    found += _from_guided(req)
    if len(found) > 1:
        raise InvalidRequest(f"a request takes one structured-output constraint; got {found[0].param} and "
                             f"{found[1].param}", param=found[1].param)
    return found[0] if found else None
