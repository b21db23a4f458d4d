"""POST /v1/chat/completions over HTTP with a fake engine client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.api.conftest import ADMIN_KEY, TenantKey
from tests.api.fake_engine import FakeEngineClient
from tests.api.sse import sse_payloads

pytestmark = pytest.mark.both_databases  # the requests reach the database: run on both

URL = "/v1/chat/completions"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


async def chat(client: httpx.AsyncClient, tenant: TenantKey, **body: Any) -> httpx.Response:
    body = {"model": "fake-base", "messages": MESSAGES, **body}
    return await client.post(URL, headers=tenant.headers, json=body)


async def test_non_streaming(client: httpx.AsyncClient, tenant: TenantKey,
                             fake_engine: FakeEngineClient) -> None:
    r = await chat(client, tenant, user="u1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["id", "object", "created", "model", "system_fingerprint", "choices", "usage"]
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hello world"},
                                "logprobs": None, "finish_reason": "stop"}]
    prompt = "system:be brief\nuser:hi\nassistant:"
    assert fake_engine.calls[0].prompt_ids == [ord(c) for c in prompt]
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12,
                             "total_tokens": len(prompt) + 12}
    # no max_tokens: as many as fit the context
    assert fake_engine.calls[0].sampling.max_tokens == 128 - len(prompt)


async def test_content_parts_developer_role_and_limits(client: httpx.AsyncClient, tenant: TenantKey,
                                                       fake_engine: FakeEngineClient) -> None:
    msgs = [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "user", "content": "q"}, {"role": "assistant", "content": None}]
    r = await chat(client, tenant, messages=msgs, max_tokens=9, max_completion_tokens=4)
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert fake_engine.calls[0].prompt_ids[:9] == [ord(c) for c in "system:ab"]
    assert fake_engine.calls[0].sampling.max_tokens == 4  # max_completion_tokens wins


async def test_logprobs(client: httpx.AsyncClient, tenant: TenantKey, fake_engine: FakeEngineClient) -> None:
    r = await chat(client, tenant, logprobs=True, top_logprobs=1, max_tokens=2)
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content == [
        {"token": "h", "logprob": -0.5, "bytes": [104], "top_logprobs": [{"token": "h", "logprob": -0.5,
                                                                          "bytes": [104]}]},
        {"token": "e", "logprob": -0.5, "bytes": [101], "top_logprobs": [{"token": "e", "logprob": -0.5,
                                                                          "bytes": [101]}]},
    ]
    r = await chat(client, tenant, logprobs=True, max_tokens=1)
    assert r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    assert [c.sampling.logprobs for c in fake_engine.calls] == [1, 0]


async def test_stream(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    r = await chat(client, tenant, stream=True, n=2, seed=1, stream_options={"include_usage": True})
    *chunks, usage, done = sse_payloads(r.text)
    assert done == "[DONE]" and usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2 * 14
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == f"hello world#{1 + i}"
        assert mine[-1]["finish_reason"] == "stop"


async def test_prefix_and_404(client: httpx.AsyncClient, tenant: TenantKey,
                              make_tenant: Callable[..., TenantKey],
                              insert_prefix: Callable[..., str]) -> None:
    insert_prefix(tenant.tenant_id, "bot", versions=2)
    other = make_tenant("other")
    insert_prefix(other.tenant_id, "theirs")
    assert (await chat(client, tenant, model="bot@1")).json()["choices"][0]["message"]["content"] == "<bot@1>"
    theirs, missing = await chat(client, tenant, model="theirs"), await chat(client, tenant, model="gone")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.text == missing.text.replace("gone", "theirs")
    insert_prefix(tenant.tenant_id, "stale", fingerprint="fp-of-another-model")
    mismatch = await chat(client, tenant, model="stale")
    assert mismatch.status_code == 409 and mismatch.json()["error"]["code"] == "model_mismatch", mismatch.text
    assert (await chat(client, tenant, model="bot@0")).text == missing.text.replace("gone", "bot@0")


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
    ({"messages": "hi"}, "messages"),
    ({"logprobs": 1}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 1000}, "max_tokens"),
    ({"max_completion_tokens": 1000}, "max_completion_tokens"),
    ({"n": 100}, "n"),
    ({"temperature": 3}, "temperature"),
    ({"messages": [{"role": "assistant", "content": "{% bad"}]}, "messages"),
])
@pytest.mark.sqlite_only
async def test_invalid(client: httpx.AsyncClient, tenant: TenantKey, body: dict[str, Any],
                       param: str) -> None:
    r = await chat(client, tenant, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"].startswith(param)


async def test_auth(client: httpx.AsyncClient) -> None:
    body = {"model": "fake-base", "messages": MESSAGES}
    assert (await client.post(URL, json=body)).status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (await client.post(URL, json=body, headers=admin)).status_code == 403
