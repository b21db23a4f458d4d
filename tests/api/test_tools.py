"""Tool calling over HTTP on the real engine (random:tiny-llama), read back by the official `openai` client:
forced calls (`required`, a named function) follow the tools' schemas, `auto` turns the model's `<tool_call>`
blocks into tool calls, streams carry OpenAI's tool-call deltas, a conversation with tool results continues, and
what cannot be served is a 400 naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI

from app.engine.client import EngineClient
from tests.api.conftest import TenantKey
from tests.api.tiny_engine import tiny_engine_client

MODEL = "tiny"
WEATHER_PARAMS = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                  "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}}}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "additionalProperties": False, "properties": {}}}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TOOLS[1]["function"]["parameters"]}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'


@pytest.fixture
def fake_engine(tmp_path: Path) -> Iterator[EngineClient]:  # the app's engine client: a real one, here
    with tiny_engine_client(tmp_path, MODEL) as client:
        yield client


@pytest.fixture
def oai(client: httpx.AsyncClient, tenant: TenantKey) -> AsyncOpenAI:
    return AsyncOpenAI(base_url="http://test/v1", api_key=tenant.key, http_client=client)


def check_call(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


async def test_required_and_named_calls_follow_the_schemas(oai: AsyncOpenAI) -> None:
    common: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 200,
                              "temperature": 0}
    # Greedy, the random model repeats its first call until max_tokens when it may make several (a list the
    # grammar cannot close for it): parallel calls are sampled.
    for choice, parallel, seed in (("required", None, 5), ("required", False, None),
                                   ({"type": "function", "function": {"name": "get_weather"}}, None, 2)):
        extra = {"seed": seed, "temperature": 1.0} if seed is not None else {}
        if parallel is not None:
            extra["parallel_tool_calls"] = parallel
        chat = await oai.chat.completions.create(**common | extra, tool_choice=choice)
        out = chat.choices[0]
        assert out.finish_reason == "tool_calls" and out.message.content is None and out.message.tool_calls
        for call in out.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            check_call(call.function.name, call.function.arguments)
        if parallel is False:
            assert len(out.message.tool_calls) == 1
        if isinstance(choice, dict):
            assert [c.function.name for c in out.message.tool_calls] == ["get_weather"]


async def accumulate(stream: Any) -> tuple[str, dict[int, dict[str, str]], str | None]:
    """Content, calls by index (id, name, arguments joined from their deltas) and finish_reason of a stream."""
    content, calls, reason = "", {}, None
    async for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += d.id or ""
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
            reason = choice.finish_reason or reason
    return content, calls, reason


async def test_streamed_tool_call_deltas(oai: AsyncOpenAI) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        stream = await oai.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                                   max_tokens=200, temperature=0, stream=True,
                                                   parallel_tool_calls=False)
        content, calls, reason = await accumulate(stream)
        assert (content, reason) == ("", "tool_calls") and calls
        for call in calls.values():
            assert call["id"].startswith("call_")
            check_call(call["name"], call["arguments"])


async def test_auto_parses_the_models_tool_call_blocks(oai: AsyncOpenAI) -> None:
    """The random model never writes a call by itself: a choice constraint makes it write one, as a model would."""
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 200,
                            "temperature": 0, "extra_body": {"structured_outputs": {"choice": [HERMES_CALL]}}}
    chat = await oai.chat.completions.create(**body)
    out = chat.choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content is None and out.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in out.message.tool_calls] == \
        [("get_weather", {"city": "Paris", "unit": "c"})]
    content, calls, reason = await accumulate(await oai.chat.completions.create(**body, stream=True))
    assert (content, reason) == ("", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [("get_weather", {"city": "Paris", "unit": "c"})]
    text = await oai.chat.completions.create(**body | {"extra_body": {"structured_outputs": {"choice": ["No."]}}})
    assert (text.choices[0].message.content, text.choices[0].finish_reason) == ("No.", "stop")
    assert text.choices[0].message.tool_calls is None


async def test_a_conversation_with_tool_results_continues(oai: AsyncOpenAI, fake_engine: EngineClient) -> None:
    messages: list[dict[str, Any]] = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
    ]
    chat = await oai.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,  # type: ignore[arg-type]
                                             max_tokens=4, temperature=0)
    assert chat.choices[0].finish_reason in ("stop", "length")
    prompt = fake_engine.tokenizer.decode(fake_engine.encode_chat(messages, tools=TOOLS))
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt  # the byte tokenizer's ChatML knows no tools
    assert HERMES_CALL in prompt and "<tool_response>\n18 C and sunny\n</tool_response>" in prompt


def test_a_template_that_knows_tools_gets_them(fake_engine: EngineClient) -> None:
    fake_engine.tokenizer.chat_template = (
        "{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}"
        "{% endfor %}")
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]
    prompt = fake_engine.tokenizer.decode(fake_engine.encode_chat(messages, tools=TOOLS))
    assert prompt == "[tool get_weather][tool get_time]<user>Weather in Paris?<assistant>[call get_weather Oslo]"


async def test_none_renders_no_tools(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    r = await client.post("/v1/chat/completions", headers=tenant.headers, json={
        "model": MODEL, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "none", "max_tokens": 3})
    assert r.status_code == 200 and "tool_calls" not in r.json()["choices"][0]["message"]
    assert r.json()["usage"]["prompt_tokens"] < 100  # the tool signatures alone are longer (one token a byte)


async def test_what_cannot_be_served_is_a_400(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    bad_params = [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}]
    for fields, param in [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": bad_params, "tool_choice": "required"}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        # `auto` leaves the call to the model: a strict schema could not be held, so it is refused, not ignored
        ({"tools": [{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}]},
         "tools[0].function.strict"),
    ]:
        r = await client.post("/v1/chat/completions", headers=tenant.headers,
                              json={"model": MODEL, "messages": MESSAGES, "max_tokens": 8, **fields})
        assert r.status_code == 400, (fields, r.text)
        assert r.json()["error"]["param"].startswith(param), (fields, r.json())


async def test_strict_is_served_where_the_call_is_constrained(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    strict = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}]
    r = await client.post("/v1/chat/completions", headers=tenant.headers, json={
        "model": MODEL, "messages": MESSAGES, "max_tokens": 200, "temperature": 0, "tools": strict,
        "tool_choice": "required", "parallel_tool_calls": False})
    assert r.status_code == 200, r.text
    [call] = r.json()["choices"][0]["message"]["tool_calls"]
    check_call(call["function"]["name"], call["function"]["arguments"])
