"""POST /v1/completions over HTTP with a fake engine client: fields, validation, streaming, model resolution,
errors, scopes and cancellation on disconnect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest

from app.engine.types import EngineOverloaded, RequestTooLarge
from tests.api.conftest import ADMIN_KEY, AppEnv, TenantKey
from tests.api.fake_engine import FAKE_FINGERPRINT, FakeEngineClient
from tests.api.sse import sse_payloads

URL = "/v1/completions"
# Most of this module checks request fields, which never reach the database; the tests that read tenants,
# keys and prefixes there also run on PostgreSQL (the whole module would cost ~30 s more per CI run).
both_databases = pytest.mark.both_databases


async def complete(client: httpx.AsyncClient, tenant: TenantKey, **body: Any) -> httpx.Response:
    return await client.post(URL, headers=tenant.headers, json={"model": "fake-base", "prompt": "hi", **body})


def assert_error(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    return err


@both_databases
async def test_non_streaming_shape_and_usage(client: httpx.AsyncClient, tenant: TenantKey,
                                             fake_engine: FakeEngineClient) -> None:
    r = await complete(client, tenant, max_tokens=50, user="u-1", metadata={"k": "v"}, store=False)
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["id", "object", "created", "model", "system_fingerprint", "choices", "usage"]
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion" and body["model"] == "fake-base"
    assert body["choices"] == [{"index": 0, "text": "hello world", "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 12, "total_tokens": 14}
    (call,) = fake_engine.calls
    assert call.prompt_ids == [ord("h"), ord("i")] and call.prefix is None
    assert call.sampling.max_tokens == 50


async def test_defaults_and_sampling_fields(client: httpx.AsyncClient, tenant: TenantKey,
                                            fake_engine: FakeEngineClient) -> None:
    await complete(client, tenant)
    await complete(client, tenant, temperature=0, top_p=0.5, seed=7, stop="x", max_tokens=3)
    default, custom = (c.sampling for c in fake_engine.calls)
    assert (default.max_tokens, default.temperature, default.top_p, default.seed, default.stop) == \
        (16, 1.0, 1.0, None, ())
    assert (custom.max_tokens, custom.temperature, custom.top_p, custom.seed, custom.stop) == \
        (3, 0.0, 0.5, 7, ("x",))


async def test_max_tokens_gives_length(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    body = (await complete(client, tenant, max_tokens=3)).json()
    assert body["choices"][0]["text"] == "hel" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


async def test_stop_list(client: httpx.AsyncClient, tenant: TenantKey, fake_engine: FakeEngineClient) -> None:
    body = (await complete(client, tenant, stop=["zz", "w"], max_tokens=50)).json()
    assert body["choices"][0] == {"index": 0, "text": "hello ", "logprobs": None, "finish_reason": "stop"}
    assert fake_engine.calls[0].sampling.stop == ("zz", "w")


@pytest.mark.parametrize("prompt", ["hi", ["hi"], [104, 105], [[104, 105]]])  # one prompt, in every form
async def test_prompt_forms(client: httpx.AsyncClient, tenant: TenantKey, fake_engine: FakeEngineClient,
                            prompt: Any) -> None:
    r = await complete(client, tenant, prompt=prompt)
    assert r.status_code == 200, r.text
    assert fake_engine.calls[0].prompt_ids == [104, 105]


async def test_n_choices_use_seed_plus_index(client: httpx.AsyncClient, tenant: TenantKey,
                                            fake_engine: FakeEngineClient) -> None:
    body = (await complete(client, tenant, n=3, seed=10, max_tokens=50)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == ["hello world#10", "hello world#11", "hello world#12"]
    assert [c.sampling.seed for c in fake_engine.calls] == [10, 11, 12]
    assert len({c.request_id for c in fake_engine.calls}) == 3
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 45, "total_tokens": 47}


async def test_logprobs_shape(client: httpx.AsyncClient, tenant: TenantKey,
                              fake_engine: FakeEngineClient) -> None:
    body = (await complete(client, tenant, logprobs=2, max_tokens=3)).json()
    lp = body["choices"][0]["logprobs"]
    assert lp == {"tokens": ["h", "e", "l"], "token_logprobs": [-0.5, -0.5, -0.5],
                  "top_logprobs": [{"h": -0.5, "i": -1.5}, {"e": -0.5, "f": -1.5}, {"l": -0.5, "m": -1.5}],
                  "text_offset": [0, 1, 2]}
    assert fake_engine.calls[0].sampling.logprobs == 2
    zero = (await complete(client, tenant, logprobs=0, max_tokens=1)).json()["choices"][0]["logprobs"]
    assert zero == {"tokens": ["h"], "token_logprobs": [-0.5], "top_logprobs": None, "text_offset": [0]}


@both_databases
async def test_stream_format(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    r = await complete(client, tenant, stream=True, max_tokens=50)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "hello world"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_stream_usage_and_n(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    r = await complete(client, tenant, stream=True, n=2, max_tokens=4, logprobs=1,
                       stream_options={"include_usage": True})
    *chunks, usage_chunk, done = sse_payloads(r.text)
    assert done == "[DONE]"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == \
        {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10}
    assert all(c["usage"] is None for c in chunks)
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == "hell" and mine[-1]["finish_reason"] == "length"
        assert [t for c in mine for t in c["logprobs"]["tokens"]] == list("hell")


@both_databases
async def test_prefix_resolution(client: httpx.AsyncClient, tenant: TenantKey, fake_engine: FakeEngineClient,
                                 insert_prefix: Callable[..., str]) -> None:
    insert_prefix(tenant.tenant_id, "poet", versions=3)
    texts = []
    for model in ("poet", "poet@2", "fake-base"):
        r = await complete(client, tenant, model=model, max_tokens=50)
        assert r.status_code == 200 and r.json()["model"] == model
        texts.append(r.json()["choices"][0]["text"])
    assert texts == ["<poet@3>", "<poet@2>", "hello world"]
    sel = fake_engine.calls[0].prefix
    assert sel is not None and (sel.tenant_id, sel.name, sel.version) == (tenant.tenant_id, "poet", 3)


@both_databases
async def test_personal_prefix(client: httpx.AsyncClient, tenant: TenantKey, app_env: AppEnv,
                               insert_prefix: Callable[..., str]) -> None:
    from app.db.models import EndUser

    with app_env.sessions() as s:
        user = EndUser(tenant_id=tenant.tenant_id, external_id="alice")
        s.add(user)
        s.commit()
        user_id = user.id
    insert_prefix(tenant.tenant_id, "user:alice", end_user_id=user_id)
    r = await complete(client, tenant, model="user:alice", max_tokens=50)
    assert r.json()["choices"][0]["text"] == "<user:alice@1>"
    assert_error(await complete(client, tenant, model="user:bob"), 404, "model")


@both_databases
async def test_other_tenants_prefix_is_a_missing_one(
    client: httpx.AsyncClient, tenant: TenantKey, make_tenant: Callable[..., TenantKey],
    insert_prefix: Callable[..., str], fake_engine: FakeEngineClient,
) -> None:
    other = make_tenant("other")
    insert_prefix(other.tenant_id, "secret", versions=2)
    insert_prefix(tenant.tenant_id, "mine", versions=1)
    theirs = await complete(client, tenant, model="secret")
    missing = await complete(client, tenant, model="nothing")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["code"] == "model_not_found"
    assert theirs.json() == json.loads(missing.text.replace("nothing", "secret"))
    assert_error(await complete(client, tenant, model="mine@2"), 404, "model")  # no such version
    # the 404 comes before any stream starts
    assert_error(await complete(client, tenant, model="secret", stream=True), 404, "model")
    assert fake_engine.calls == []


@pytest.mark.parametrize("model", ["poet@0", "poet@-1", "poet@abc", "poet@"])
async def test_malformed_or_zero_version_is_a_missing_model(
    client: httpx.AsyncClient, tenant: TenantKey, insert_prefix: Callable[..., str], fake_engine: FakeEngineClient,
    model: str,
) -> None:
    insert_prefix(tenant.tenant_id, "poet", versions=2)
    r, missing = await complete(client, tenant, model=model), await complete(client, tenant, model="nothing")
    assert assert_error(r, 404, "model")["code"] == "model_not_found"
    assert r.json() == json.loads(missing.text.replace("nothing", model))
    assert (await client.get(f"/v1/models/{model}", headers=tenant.headers)).status_code == 404
    assert fake_engine.calls == []


async def test_prefix_made_for_another_base_model_is_refused_up_front(
    client: httpx.AsyncClient, tenant: TenantKey, insert_prefix: Callable[..., str], fake_engine: FakeEngineClient,
) -> None:
    """E.g. the operator changed PREFIXSERVE_MODEL: a 409 naming both fingerprints, not a 503 from the engine."""
    insert_prefix(tenant.tenant_id, "old", versions=2, fingerprint="fp-of-another-model")
    for stream in (False, True):
        err = assert_error(await complete(client, tenant, model="old", stream=stream), 409, "model")
        assert err["code"] == "model_mismatch" and err["type"] == "conflict_error"
        assert all(s in err["message"] for s in ("old@2", "'fp-of-another-model'", "'fake-base'",
                                                  f"'{FAKE_FINGERPRINT}'"))
    assert "old@1" in assert_error(await complete(client, tenant, model="old@1"), 409, "model")["message"]
    assert fake_engine.calls == []


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", 0), ("max_tokens", "5"), ("max_tokens", 1.5), ("temperature", 2.5), ("temperature", -1),
    ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("n", 65), ("seed", "x"), ("seed", True),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", ""), ("stop", 5), ("logprobs", 6), ("logprobs", -1),
    ("stream", "yes"), ("prompt", [[]]), ("prompt", []), ("prompt", 5), ("prompt", ["a", 1]), ("user", 5),
    ("model", 3), ("stream_options", {"include_usage": "yes"}), ("stream_options", {"frobnicate": True}),
    ("store", True), ("metadata", {"k": 1}), ("echo", "yes"), ("best_of", 0), ("best_of", 65),
])
async def test_invalid_fields(client: httpx.AsyncClient, tenant: TenantKey, field: str, value: Any) -> None:
    r = await complete(client, tenant, **{field: value})
    err = assert_error(r, 400, r.json()["error"]["param"])
    assert err["param"] is not None and err["param"].split(".")[0] == field
    assert err["type"] == "invalid_request_error"


async def test_missing_and_malformed_bodies(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    assert_error(await client.post(URL, headers=tenant.headers, json={"prompt": "x"}), 400, "model")
    headers = {**tenant.headers, "content-type": "application/json"}
    r = await client.post(URL, headers=headers, content=b"{nope")
    assert r.status_code == 400
    r = await client.post(URL, headers=tenant.headers, json=[1, 2])
    assert r.status_code == 400


async def test_prompt_checks(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    assert_error(await complete(client, tenant, prompt=""), 400, "prompt")
    assert_error(await complete(client, tenant, prompt=[1, 256]), 400, "prompt")
    assert_error(await complete(client, tenant, prompt=[-1]), 400, "prompt")
    err = assert_error(await complete(client, tenant, prompt="x" * 100, max_tokens=29), 400, "max_tokens")
    assert "128" in err["message"] and err["code"] == "context_length_exceeded"
    assert (await complete(client, tenant, prompt="x" * 100, max_tokens=28)).status_code == 200


async def test_prefix_tokens_count_against_context(client: httpx.AsyncClient, tenant: TenantKey,
                                                   insert_prefix: Callable[..., str]) -> None:
    insert_prefix(tenant.tenant_id, "p", num_virtual_tokens=20)
    assert_error(await complete(client, tenant, model="p", prompt="x" * 100, max_tokens=9), 400, "max_tokens")
    assert (await complete(client, tenant, model="p", prompt="x" * 100, max_tokens=8)).status_code == 200


async def test_engine_admission_errors(client: httpx.AsyncClient, tenant: TenantKey,
                                       fake_engine: FakeEngineClient) -> None:
    fake_engine.raise_on_submit = RequestTooLarge("prompt + max_tokens exceeds the engine budget of 64")
    err = assert_error(await complete(client, tenant, stream=True), 400, "max_tokens")
    assert "64" in err["message"]
    fake_engine.raise_on_submit = EngineOverloaded("1024 requests are already waiting")
    r = await complete(client, tenant, n=2)
    assert_error(r, 429, None)
    assert r.headers["retry-after"] == "1"


async def test_engine_error_events(client: httpx.AsyncClient, tenant: TenantKey,
                                   fake_engine: FakeEngineClient, insert_prefix: Callable[..., str]) -> None:
    insert_prefix(tenant.tenant_id, "broken")
    fake_engine.error_event = "prefix could not be loaded: blob missing"
    fake_engine.error_kind = "prefix_unavailable"
    for stream in (False, True):
        err = assert_error(await complete(client, tenant, model="broken", stream=stream), 503, "model")
        assert "could not be loaded" in err["message"]
    fake_engine.error_event = "prefix + prompt + max_tokens exceed the batch token budget"
    fake_engine.error_kind = "too_large"
    assert_error(await complete(client, tenant), 400, "max_tokens")
    fake_engine.error_event = "internal error during prefill: RuntimeError"
    fake_engine.error_kind = "internal"
    assert (await complete(client, tenant)).status_code == 503


async def test_error_mid_stream_sends_error_chunk_then_done(tenant: TenantKey, app_env: AppEnv,
                                                            client: httpx.AsyncClient) -> None:
    from app.engine.types import TokenEvent

    class FailsLater(FakeEngineClient):
        async def generate(self, **kw: Any):  # type: ignore[no-untyped-def, override]
            yield TokenEvent(request_id="r", token_id=104, text="h")
            yield TokenEvent(request_id="r", token_id=None, text="", finish_reason="error",
                             error="internal error")

    app_env.app.state.runtime = replace(app_env.app.state.runtime, engine_client=FailsLater())
    events = sse_payloads((await complete(client, tenant, stream=True)).text)
    assert events[0]["choices"][0]["text"] == "h"
    assert events[1]["error"]["type"] == "service_unavailable" and events[2] == "[DONE]"


@both_databases
async def test_auth_and_scopes(client: httpx.AsyncClient, tenant: TenantKey,
                               make_tenant: Callable[..., TenantKey]) -> None:
    body = {"model": "fake-base", "prompt": "hi"}
    assert_error(await client.post(URL, json=body), 401, None)
    assert_error(await client.post(URL, json=body, headers={"Authorization": "Bearer nope"}), 401, None)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert_error(await client.post(URL, json=body, headers=admin), 403, None)
    inference_only = make_tenant("inf", scopes="inference")
    assert (await client.post(URL, json=body, headers=inference_only.headers)).status_code == 200
    manage_only = make_tenant("mgr", scopes="manage")
    assert (await client.post(URL, json=body, headers=manage_only.headers)).status_code == 200


async def call_and_disconnect(app_env: AppEnv, tenant: TenantKey, body: dict[str, Any],
                              disconnect_after_chunks: int) -> list[dict[str, Any]]:
    """Drive the ASGI app directly: send the body, then report `http.disconnect` once the app has sent
    `disconnect_after_chunks` body messages (0: right away, while a non-streaming request generates)."""
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()
    request_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if sum(m["type"] == "http.response.body" for m in sent) >= disconnect_after_chunks:
            gone.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": URL, "raw_path": URL.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {tenant.key}".encode())],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    if disconnect_after_chunks == 0:
        asyncio.get_running_loop().call_later(0.2, gone.set)
    await asyncio.wait_for(app_env.app(scope, receive, send), timeout=10)
    return sent


async def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("n", [1, 3])
async def test_stream_disconnect_cancels_engine_requests(client: httpx.AsyncClient, tenant: TenantKey,
                                                         app_env: AppEnv, n: int) -> None:
    app_env.engine.token_delay_s = 0.05
    await call_and_disconnect(app_env, tenant, {"model": "fake-base", "prompt": "hi", "stream": True,
                                                "max_tokens": 100, "n": n}, disconnect_after_chunks=2)
    await wait_for(lambda: len(app_env.engine.cancelled) == n)
    assert not any(c.finished for c in app_env.engine.calls)


async def test_non_streaming_disconnect_cancels_engine_request(client: httpx.AsyncClient, tenant: TenantKey,
                                                               app_env: AppEnv) -> None:
    app_env.engine.token_delay_s = 0.1  # 12 tokens: 1.2 s; the client leaves after 0.2 s
    await call_and_disconnect(app_env, tenant, {"model": "fake-base", "prompt": "hi", "max_tokens": 100},
                              disconnect_after_chunks=0)
    await wait_for(lambda: len(app_env.engine.cancelled) == 1)
