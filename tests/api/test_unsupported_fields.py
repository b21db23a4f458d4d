"""Nothing is silently ignored: a request field the server does not declare, in any body and at any depth, is a
400 that names it ("`X` is not supported", code unsupported_parameter), and nothing runs."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.api.conftest import ADMIN_KEY, AppEnv, TenantKey
from tests.api.fake_engine import FakeEngineClient
from tests.api.test_length_controls import post

# OpenAI request fields this server does not implement (the structured-output and tool fields have their own
# tests), and a field nobody defines.
UNSUPPORTED = {
    "completions": ["suffix", "service_tier", "frobnicate"],
    "chat": ["functions", "function_call", "audio", "modalities", "prediction", "service_tier", "reasoning_effort",
             "web_search_options", "frobnicate"],
}


def assert_unsupported(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": f"`{param}` is not supported", "type": "invalid_request_error",
                                 "param": param, "code": "unsupported_parameter"}


async def test_unsupported_generation_fields(client: httpx.AsyncClient, tenant: TenantKey,
                                             fake_engine: FakeEngineClient) -> None:
    for endpoint, fields in UNSUPPORTED.items():
        for field in fields:
            assert_unsupported(await post(client, tenant, endpoint, **{field: None}), field)
            assert_unsupported(await post(client, tenant, endpoint, stream=True, **{field: {"x": 1}}), field)
    assert fake_engine.calls == []


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_nested_fields_and_store(client: httpx.AsyncClient, tenant: TenantKey,
                                       fake_engine: FakeEngineClient, endpoint: str) -> None:
    r = await post(client, tenant, endpoint, stream=True, stream_options={"include_usage": True, "extra": 1})
    assert_unsupported(r, "stream_options.extra")
    r = await post(client, tenant, endpoint, store=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "store", r.text
    assert fake_engine.calls == []
    assert (await post(client, tenant, endpoint, store=False, user="u", metadata={"a": "b"})).status_code == 200


async def test_message_fields(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    r = await client.post("/v1/chat/completions", headers=tenant.headers, json={
        "model": "fake-base", "messages": [{"role": "user", "content": "hi", "frobnicate": 1}]})
    assert_unsupported(r, "messages.0.frobnicate")


async def test_other_request_bodies(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert_unsupported(await client.post("/admin/tenants", headers=admin, json={"name": "x", "plan": "gold"}),
                       "plan")
    r = await client.post(f"/admin/tenants/{tenant.tenant_id}/keys", headers=admin,
                          json={"scopes": ["inference"], "expires": 1})
    assert_unsupported(r, "expires")
    r = await client.post("/v1/fine_tuning/jobs", headers=tenant.headers,
                          json={"model": "fake-base", "training_file": "file-x", "integrations": []})
    assert_unsupported(r, "integrations")
    r = await client.post("/v1/fine_tuning/jobs", headers=tenant.headers,
                          json={"model": "fake-base", "training_file": "file-x", "hyperparameters": {"epochs": 2}})
    assert_unsupported(r, "hyperparameters.epochs")
    r = await client.post("/v1/users/ann/examples", headers=tenant.headers,
                          json={"examples": [{"prompt": "a", "completion": "b"}], "note": "x"})
    assert_unsupported(r, "note")
    assert_unsupported(await client.post("/v1/users/ann/personalize", headers=tenant.headers, json={"x": 1}), "x")


async def test_the_openai_client_sends_only_what_is_set(app_env: AppEnv, client: httpx.AsyncClient,
                                                        tenant: TenantKey) -> None:
    """The official client (what most callers use) sends no field its caller did not set: its default requests
    pass, and an unsupported argument comes back as its BadRequestError naming the field."""
    transport = httpx.ASGITransport(app=app_env.app)
    oa = openai.AsyncOpenAI(base_url="http://test/v1", api_key=tenant.key,
                            http_client=httpx.AsyncClient(transport=transport, base_url="http://test"))
    chat = await oa.chat.completions.create(model="fake-base", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "hello world"
    done = await oa.completions.create(model="fake-base", prompt=["a", "b"], n=2, max_tokens=3,
                                       extra_body={"top_k": 5, "repetition_penalty": 1.1})
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    with pytest.raises(openai.BadRequestError, match="suffix"):
        await oa.completions.create(model="fake-base", prompt="a", suffix="!")


async def test_multipart_form_fields(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    """An upload (a multipart form) refuses a field it does not take the same way, and stores nothing (the prefix
    upload's form: tests/api/test_prefixes.py test_bad_forms_and_names)."""
    r = await client.post("/v1/files", headers=tenant.headers, data={"purpose": "fine-tune", "expires_after": "1"},
                          files={"file": ("a.jsonl", b'{"prompt": "a", "completion": "b"}\n')})
    assert_unsupported(r, "expires_after")
    assert (await client.get("/v1/files", headers=tenant.headers)).json()["data"] == []
