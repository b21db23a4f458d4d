"""Structured outputs over HTTP, on the real engine (random:tiny-llama): OpenAI's `response_format`, vLLM's
`structured_outputs` and its older `guided_*` fields, in chat and completions, streamed or not, through the
official `openai` client too; a bad or ambiguous constraint is a 400 naming the field."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI

from app.engine.client import EngineClient
from tests.api.conftest import AppEnv, TenantKey
from tests.api.tiny_engine import tiny_engine_client
from tests.engine.structured_corpus import SCHEMAS

MODEL = "tiny"
SCHEMA = SCHEMAS["string_patterns"]
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "sku", "schema": SCHEMA, "strict": True}}


@pytest.fixture
def fake_engine(tmp_path: Path) -> Iterator[EngineClient]:  # the app's engine client: a real one, here
    with tiny_engine_client(tmp_path, MODEL) as client:
        yield client


async def post(client: httpx.AsyncClient, tenant: TenantKey, endpoint: str, **body: Any) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 300, "temperature": 0, **body}
    if endpoint == "chat":
        return await client.post("/v1/chat/completions", headers=tenant.headers,
                                 json={"messages": [{"role": "user", "content": "a sku"}], **body})
    return await client.post("/v1/completions", headers=tenant.headers, json={"prompt": "a sku:", **body})


def text_of(r: httpx.Response) -> tuple[str, str]:
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"], choice["finish_reason"]


@pytest.fixture(params=["chat", "completions"])
def endpoint(request: pytest.FixtureRequest) -> str:
    return str(request.param)


JSON_SCHEMA_FIELDS: list[dict[str, Any]] = [
    {"response_format": JSON_SCHEMA_FORMAT},
    {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
    {"structured_outputs": {"json": json.dumps(SCHEMA)}},
    {"guided_json": SCHEMA, "guided_whitespace_pattern": " ?"},
]


async def test_json_schema_fields(client: httpx.AsyncClient, tenant: TenantKey, endpoint: str) -> None:
    for fields in JSON_SCHEMA_FIELDS if endpoint == "chat" else JSON_SCHEMA_FIELDS[1:2]:  # one path after parsing
        text, reason = text_of(await post(client, tenant, endpoint, **fields))
        assert reason == "stop", (fields, text)
        jsonschema.validate(json.loads(text), SCHEMA)
    # Required properties come in the schema's order (name before age): the schema's key order is kept.
    ordered = SCHEMAS["required_fields"]
    text, _ = text_of(await post(client, tenant, endpoint, structured_outputs={"json": ordered,
                                                                                "disable_any_whitespace": True}))
    assert list(json.loads(text)) == ["name", "age"], text


async def test_json_object_regex_choice_grammar(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
        ({"structured_outputs": {"json_object": True}}, lambda t: isinstance(json.loads(t), dict)),
        ({"structured_outputs": {"regex": "[0-9]{4}"}}, lambda t: re.fullmatch("[0-9]{4}", t)),
        ({"guided_regex": "[0-9]{4}"}, lambda t: re.fullmatch("[0-9]{4}", t)),
        ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
        ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        ({"structured_outputs": {"grammar": 'root ::= "go" ("!")?'}}, lambda t: t in ("go", "go!")),
        ({"guided_grammar": 'root ::= "go" ("!")?'}, lambda t: t in ("go", "go!")),
        ({"response_format": {"type": "text"}, "max_tokens": 3}, lambda t: True),
    ]
    for fields, check in cases:
        text, reason = text_of(await post(client, tenant, "chat", **fields))
        assert check(text) and (reason == "stop" or "text" in str(fields)), (fields, text)


async def test_streamed_chat_is_valid_json(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    r = await post(client, tenant, "chat", stream=True, structured_outputs={"json": SCHEMA,
                                                                         "disable_any_whitespace": True})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


async def test_openai_client_parses_it(app_env: AppEnv, client: httpx.AsyncClient, tenant: TenantKey) -> None:
    oai = AsyncOpenAI(base_url="http://test/v1", api_key=tenant.key, http_client=client)
    chat = await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a sku"}],
                                             max_tokens=300, temperature=0, n=2, seed=3,
                                             response_format=JSON_SCHEMA_FORMAT)  # type: ignore[arg-type]
    for choice in chat.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
    comp = await oai.completions.create(model=MODEL, prompt="n:", max_tokens=10, temperature=0,
                                        extra_body={"structured_outputs": {"regex": "[1-9]{2}"}})
    assert re.fullmatch("[1-9]{2}", comp.choices[0].text)


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", "foo"),
    ({"structured_outputs": {"regex": "a{3"}}, "structured_outputs", "a{3"),
    ({"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs", "foo"),
    ({"guided_json": "{not json"}, "guided_json", "not JSON"),
    ({"guided_json": "[1, 2]"}, "guided_json", "list"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "regex, choice"),
    ({"structured_outputs": {}}, "structured_outputs", "none"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs", "json_object"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "structural_tag"),
    ({"structured_outputs": {"json": {}, "disable_additional_properties": True}}, "structured_outputs",
     "disable_additional_properties"),
    ({"structured_outputs": {"regex": "a", "disable_any_whitespace": True}}, "structured_outputs", "whitespace"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "response_format"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "guided_json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "xml"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "at least 1"),
    ({"structured_outputs": {"regex": "a", "backend": "x"}}, "structured_outputs.backend", "not supported"),
]


async def test_a_bad_constraint_is_a_400_naming_its_field(client: httpx.AsyncClient, tenant: TenantKey,
                                                          endpoint: str) -> None:
    for fields, param, fragment in BAD:
        r = await post(client, tenant, endpoint, **fields)
        assert r.status_code == 400, (fields, r.text)
        error = r.json()["error"]
        assert error["param"].startswith(param) and fragment in error["message"], (fields, error)
