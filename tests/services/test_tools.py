"""Tool calling's pure parts: the request's settings and constraints, the Hermes parser (whole and streamed), the
chat-template rewriting for templates without tools."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.engine.protocol import StructuredOutput
from app.engine.tool_template import hermes_messages, knows_tools, native_messages
from app.errors import InvalidRequest
from app.protocol.chat import ChatCompletionRequest
from app.services.tool_stream import ToolStream
from app.services.tools import HermesParser, chat_tools, one_constraint, turn_of

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


def test_modes_and_their_constraints() -> None:
    assert chat_tools(request()).mode == "none"
    assert chat_tools(request(tools=[WEATHER])).mode == "auto"
    none = chat_tools(request(tools=[WEATHER], tool_choice="none"))
    assert (none.mode, none.template_tools, none.constraint) == ("none", None, None)
    required = chat_tools(request(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False))
    assert required.constraint is not None and required.constraint.param == "tools"
    assert required.constraint.kind == "grammar"
    start, call, body = required.constraint.spec.split("\n")
    assert (start, call) == ("start: call", r'call: "<tool_call>\n" body "\n</tool_call>"')  # exactly one call
    schema = json.loads(body.removeprefix("body: %json "))
    assert [o["properties"]["name"]["const"] for o in schema["anyOf"]] == ["get_weather", "get_time"]
    assert list(schema["anyOf"][0]["properties"]) == ["name", "arguments"]  # in the order models write them
    assert schema["anyOf"][1]["properties"]["arguments"] == {"type": "object"}  # no parameters: any
    several = chat_tools(request(tools=[WEATHER], tool_choice="required")).constraint
    assert several is not None and several.spec.startswith('start: call ("\\n" call)*\n')
    named = chat_tools(request(tools=[WEATHER, TIME],
                               tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert (named.mode, named.named) == ("named", "get_weather")
    assert named.constraint is not None and json.loads(named.constraint.spec) == WEATHER["function"]["parameters"]


@pytest.mark.parametrize(("fields", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
])
def test_what_cannot_be_served_is_a_400(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        chat_tools(request(**fields))
    assert err.value.param == param


def test_a_forced_call_excludes_another_constraint() -> None:
    forced = chat_tools(request(tools=[WEATHER], tool_choice="required"))
    other = StructuredOutput("regex", "a", param="response_format")
    with pytest.raises(InvalidRequest):
        one_constraint(forced, other)
    assert one_constraint(chat_tools(request(tools=[WEATHER])), other) is other  # auto: the other one holds


AUTO_OUTPUT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n')


def test_auto_turn_parses_hermes_blocks() -> None:
    tools = chat_tools(request(tools=[WEATHER, TIME]))
    content, calls, reason = turn_of(tools, AUTO_OUTPUT, "stop")
    assert (content, reason) == ("Let me check.", "tool_calls")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("get_time", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    one = chat_tools(request(tools=[WEATHER, TIME], parallel_tool_calls=False))
    assert [c.name for c in turn_of(one, AUTO_OUTPUT, "stop")[1]] == ["get_weather"]
    assert turn_of(tools, "Just text <tool_call>not json</tool_call>", "stop") == \
        ("Just text <tool_call>not json</tool_call>", [], "stop")
    assert turn_of(tools, "cut <tool_call>{\"name\"", "length") == ("cut <tool_call>{\"name\"", [], "length")


def test_streamed_parse_equals_the_whole_one_at_any_split() -> None:
    for size in (1, 3, 7, 50):
        parser, content, calls = HermesParser(), "", []
        for i in range(0, len(AUTO_OUTPUT), size):
            piece, new = parser.feed(AUTO_OUTPUT[i:i + size])
            content, calls = content + piece, calls + new
            assert "<tool" not in content
        content += parser.close()
        assert content.strip() == "Let me check." and [c.name for c in calls] == ["get_weather", "get_time"]


def test_stream_deltas() -> None:
    auto = ToolStream(chat_tools(request(tools=[WEATHER, TIME])))
    pieces = [AUTO_OUTPUT[i:i + 5] for i in range(0, len(AUTO_OUTPUT), 5)]
    out = [auto.step(p, i == len(pieces) - 1, "stop" if i == len(pieces) - 1 else None)
           for i, p in enumerate(pieces)]
    assert "".join(c for c, _, _ in out if c) == "Let me check."
    deltas = [d for _, ds, _ in out for d in ds]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "get_weather"), (1, "get_time")]
    assert out[-1][2] == "tool_calls"
    named = ToolStream(chat_tools(request(tools=[WEATHER],
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})))
    first, last = named.step('{"city": ', False, None), named.step('"Oslo"}', True, "stop")
    assert first[1][0].model_dump()["function"] == {"name": "get_weather", "arguments": ""}
    assert first[1][1].function.arguments + last[1][0].function.arguments == '{"city": "Oslo"}'
    assert last[2] == "tool_calls"
    required = ToolStream(chat_tools(request(tools=[WEATHER], tool_choice="required")))
    assert required.step('<tool_call>\n{"name": "get_weather", ', False, None) == (None, [], None)
    _, calls, reason = required.step('"arguments": {"city": "Rome"}}\n</tool_call>', True, "stop")
    assert (calls[0].function.name, json.loads(calls[0].function.arguments or ""), reason) == \
        ("get_weather", {"city": "Rome"}, "tool_calls")


CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]


def test_templates_without_tools_get_the_hermes_format() -> None:
    out = hermes_messages(CONVERSATION, [WEATHER])
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in out[0]["content"] and "<tools>" in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert out[3]["content"] == "<tool_response>\n18 C, sunny\n</tool_response>"
    with_system = hermes_messages([{"role": "system", "content": "Be brief."}, *CONVERSATION], [WEATHER])
    assert with_system[0]["content"].startswith("Be brief.\n\n# Tools") and len(with_system) == 4


def test_templates_with_tools_get_arguments_as_objects() -> None:
    assert knows_tools("{% if tools %}...{% endif %}") and not knows_tools("{{ messages }}") and not knows_tools(None)
    out = native_messages(CONVERSATION)
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert out[2] == CONVERSATION[2]
