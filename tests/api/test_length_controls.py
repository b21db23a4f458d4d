"""vLLM's `ignore_eos` and `min_tokens` over HTTP, in completions and chat: accepted, passed to the engine for
every choice, and a bad value is a 400 naming the field."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.conftest import TenantKey
from tests.api.fake_engine import FakeEngineClient

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT_PROMPT_LEN = len("user:hi\nassistant:")  # the fake engine's chat template


async def post(client: httpx.AsyncClient, tenant: TenantKey, endpoint: str, **body: Any) -> httpx.Response:
    if endpoint == "chat":
        return await client.post("/v1/chat/completions", headers=tenant.headers,
                                 json={"model": "fake-base", "messages": MESSAGES, **body})
    return await client.post("/v1/completions", headers=tenant.headers,
                             json={"model": "fake-base", "prompt": "hi", **body})


def assert_400(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


@pytest.fixture(params=["completions", "chat"])
def endpoint(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_fields_reach_the_engine_for_every_choice(client: httpx.AsyncClient, tenant: TenantKey,
                                                        fake_engine: FakeEngineClient, endpoint: str) -> None:
    r = await post(client, tenant, endpoint, max_tokens=8, ignore_eos=True, min_tokens=8, n=2, seed=1)
    assert r.status_code == 200, r.text
    assert [(c.sampling.ignore_eos, c.sampling.min_tokens, c.sampling.max_tokens) for c in fake_engine.calls] == \
        [(True, 8, 8)] * 2


async def test_defaults_leave_eos_and_stop_as_they_were(client: httpx.AsyncClient, tenant: TenantKey,
                                                        fake_engine: FakeEngineClient, endpoint: str) -> None:
    r = await post(client, tenant, endpoint, max_tokens=8)
    assert r.status_code == 200, r.text
    (call,) = fake_engine.calls
    assert (call.sampling.ignore_eos, call.sampling.min_tokens) == (False, 0)


@pytest.mark.parametrize(("field", "value"), [
    ("min_tokens", -1), ("min_tokens", "3"), ("min_tokens", 1.5), ("min_tokens", None), ("min_tokens", True),
    ("ignore_eos", "true"), ("ignore_eos", 1), ("ignore_eos", None),
])
async def test_bad_values_are_a_400_naming_the_field(client: httpx.AsyncClient, tenant: TenantKey,
                                                     fake_engine: FakeEngineClient, endpoint: str, field: str,
                                                     value: Any) -> None:
    assert_400(await post(client, tenant, endpoint, max_tokens=8, **{field: value}), field)
    assert fake_engine.calls == []


async def test_min_tokens_above_max_tokens_is_a_400(client: httpx.AsyncClient, tenant: TenantKey,
                                                     fake_engine: FakeEngineClient, endpoint: str) -> None:
    r = await post(client, tenant, endpoint, max_tokens=4, min_tokens=5)
    assert_400(r, "min_tokens")
    assert "max_tokens=4" in r.json()["error"]["message"]
    assert fake_engine.calls == []


async def test_completions_default_max_tokens_bounds_min_tokens(client: httpx.AsyncClient, tenant: TenantKey,
                                                                fake_engine: FakeEngineClient) -> None:
    """Completions' max_tokens defaults to 16 (OpenAI, vLLM): min_tokens is checked against it."""
    assert_400(await post(client, tenant, "completions", min_tokens=17), "min_tokens")
    r = await post(client, tenant, "completions", min_tokens=16)
    assert r.status_code == 200 and fake_engine.calls[0].sampling.max_tokens == 16


async def test_chat_min_tokens_against_its_limits(client: httpx.AsyncClient, tenant: TenantKey,
                                                   fake_engine: FakeEngineClient) -> None:
    """max_completion_tokens bounds min_tokens like max_tokens; with no limit, what fits the context does."""
    assert_400(await post(client, tenant, "chat", max_completion_tokens=4, min_tokens=5), "min_tokens")
    room = fake_engine.context_length - CHAT_PROMPT_LEN
    assert_400(await post(client, tenant, "chat", min_tokens=room + 1), "min_tokens")
    r = await post(client, tenant, "chat", min_tokens=room, ignore_eos=True)
    assert r.status_code == 200, r.text
    (call,) = fake_engine.calls
    assert (call.sampling.max_tokens, call.sampling.min_tokens, call.sampling.ignore_eos) == (room, room, True)


async def test_openapi_documents_the_fields(client: httpx.AsyncClient) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        assert props["ignore_eos"]["type"] == "boolean" and props["min_tokens"]["minimum"] == 0
