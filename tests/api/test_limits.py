"""Per-tenant limits over HTTP: the admin endpoints, and each limit's 429 (with Retry-After, naming the limit)
with the in-process counters and with real Redis shared by two app replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.main import create_app
from app.runtime import Runtime, open_runtime
from tests.api.conftest import ADMIN_KEY, TenantKey
from tests.api.fake_engine import FakeEngineClient, with_fake_model
from tests.api.fixtures_admin import ADMIN as API_ADMIN
from tests.api.fixtures_admin import Api, api_fixture, bearer, native_bytes  # noqa: F401
from tests.engine.helpers import until

pytestmark = pytest.mark.both_databases  # the requests reach the database: run on both

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
COMPLETION = {"model": "fake-base", "prompt": "hi", "max_tokens": 50}
FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests", "max_prefixes",
          "max_stored_bytes", "max_concurrent_jobs", "max_examples_per_user", "max_concurrent_batches")


async def put_limits(client: httpx.AsyncClient, tenant_id: str, **values: int | None) -> dict[str, Any]:
    r = await client.put(f"/admin/tenants/{tenant_id}/limits", json=values, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def assert_limited(r: httpx.Response, limit: str, value: int) -> None:
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert f"{limit} limit of {value} reached" in err["message"]
    assert err["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1


async def test_admin_reads_and_sets_limits(client: httpx.AsyncClient, tenant: TenantKey, settings: Settings) -> None:
    r = await client.get(f"/admin/tenants/{tenant.tenant_id}/limits", headers=ADMIN)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "tenant.limits" and body["tenant_id"] == tenant.tenant_id
    assert body["configured"] == dict.fromkeys(FIELDS)
    assert body["effective"]["requests_per_minute"] == settings.tenant_requests_per_minute
    body = await put_limits(client, tenant.tenant_id, requests_per_minute=7, max_stored_bytes=2**40)
    assert body["configured"]["requests_per_minute"] == 7 and body["effective"]["max_stored_bytes"] == 2**40
    assert body["configured"]["max_prefixes"] is None
    assert body["effective"]["max_prefixes"] == settings.tenant_max_prefixes
    # PUT replaces: an absent field returns to the default.
    body = await put_limits(client, tenant.tenant_id, max_prefixes=3)
    assert body["configured"]["requests_per_minute"] is None and body["configured"]["max_prefixes"] == 3
    got = await client.get(f"/admin/tenants/{tenant.tenant_id}/limits", headers=ADMIN)
    assert got.json() == body


@pytest.mark.parametrize("body", [{"requests_per_minute": -1}, {"max_prefixes": 2**31},
                                  {"tokens_per_minute": "many"}, {"bogus": 1}, [1]])
@pytest.mark.sqlite_only
async def test_bad_limit_bodies(client: httpx.AsyncClient, tenant: TenantKey, body: Any) -> None:
    r = await client.put(f"/admin/tenants/{tenant.tenant_id}/limits", json=body, headers=ADMIN)
    assert r.status_code == 400, r.text


async def test_limits_endpoints_need_admin_and_a_tenant(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    path = f"/admin/tenants/{tenant.tenant_id}/limits"
    assert (await client.get(path, headers=tenant.headers)).status_code == 403
    assert (await client.put(path, json={}, headers=tenant.headers)).status_code == 403
    assert (await client.get(path)).status_code == 401
    missing = await client.get("/admin/tenants/ten_nothing/limits", headers=ADMIN)
    assert missing.status_code == 404
    assert (await client.put("/admin/tenants/ten_nothing/limits", json={}, headers=ADMIN)).status_code == 404


async def test_requests_per_minute(client: httpx.AsyncClient, make_tenant: Callable[..., TenantKey]) -> None:
    a, b = make_tenant("a"), make_tenant("b")
    await put_limits(client, a.tenant_id, requests_per_minute=3)
    for _ in range(3):
        assert (await client.get("/v1/models", headers=a.headers)).status_code == 200
    assert_limited(await client.get("/v1/models", headers=a.headers), "requests_per_minute", 3)
    # Every tenant route counts, inference and management alike; the other tenant is not affected.
    assert_limited(await client.post("/v1/completions", json=COMPLETION, headers=a.headers),
                   "requests_per_minute", 3)
    assert_limited(await client.get("/v1/prefixes", headers=a.headers), "requests_per_minute", 3)
    assert (await client.get("/v1/models", headers=b.headers)).status_code == 200
    # Raising the limit takes effect at once (same window).
    await put_limits(client, a.tenant_id, requests_per_minute=100)
    assert (await client.get("/v1/models", headers=a.headers)).status_code == 200


async def test_zero_suspends_a_tenant(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    await put_limits(client, tenant.tenant_id, requests_per_minute=0)
    assert_limited(await client.get("/v1/models", headers=tenant.headers), "requests_per_minute", 0)


async def test_tokens_per_minute_counts_completion_tokens(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    """The fake engine generates 12 tokens (`hello world` + EOS) per choice; they count after generation."""
    await put_limits(client, tenant.tenant_id, tokens_per_minute=30)
    r = await client.post("/v1/completions", json={**COMPLETION, "n": 2}, headers=tenant.headers)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 24
    # 24 < 30: room left, so the next (streamed) request runs, and overshoots to 36.
    async with client.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True},
                             headers=tenant.headers) as s:
        assert s.status_code == 200
        assert "[DONE]" in "".join([line async for line in s.aiter_lines()])
    r = await client.post("/v1/chat/completions", headers=tenant.headers,
                          json={"model": "fake-base", "messages": [{"role": "user", "content": "hi"}]})
    assert_limited(r, "tokens_per_minute", 30)
    assert (await client.get("/v1/models", headers=tenant.headers)).status_code == 200  # not a generation


async def test_max_concurrent_requests(client: httpx.AsyncClient, tenant: TenantKey,
                                       fake_engine: FakeEngineClient) -> None:
    await put_limits(client, tenant.tenant_id, max_concurrent_requests=1)
    calls = fake_engine.calls
    fake_engine.hold_after_first = held = asyncio.Event()  # each generation waits after its first token
    first = asyncio.create_task(client.post("/v1/completions", json=COMPLETION, headers=tenant.headers))
    await until(lambda: len(calls) == 1 and calls[0].first_sent, "the first request is generating")
    assert_limited(await client.post("/v1/completions", json=COMPLETION, headers=tenant.headers),
                   "max_concurrent_requests", 1)
    assert (await client.get("/v1/models", headers=tenant.headers)).status_code == 200  # only generations
    held.set()
    assert (await first).status_code == 200
    # The slot is back. A stream holds it until its last event, not only until the endpoint returns (which
    # it does with the first token).
    fake_engine.hold_after_first = held = asyncio.Event()
    stream = asyncio.create_task(client.post("/v1/completions", json={**COMPLETION, "stream": True},
                                             headers=tenant.headers))
    await until(lambda: len(calls) == 2 and calls[1].first_sent, "the stream is generating")
    assert_limited(await client.post("/v1/completions", json=COMPLETION, headers=tenant.headers),
                   "max_concurrent_requests", 1)
    held.set()
    assert "[DONE]" in (await stream).text
    fake_engine.hold_after_first = None
    assert (await client.post("/v1/completions", json=COMPLETION, headers=tenant.headers)).status_code == 200


async def test_refused_requests_do_not_hold_slots(client: httpx.AsyncClient, tenant: TenantKey,
                                                  fake_engine: FakeEngineClient) -> None:
    """Errors (unknown model, engine overload) release the slot: a tenant is never locked out by failures."""
    from app.engine.types import EngineOverloaded

    await put_limits(client, tenant.tenant_id, max_concurrent_requests=1)
    for _ in range(3):
        r = await client.post("/v1/completions", json={**COMPLETION, "model": "nope"}, headers=tenant.headers)
        assert r.status_code == 404
    fake_engine.raise_on_submit = EngineOverloaded("full")
    for _ in range(3):
        r = await client.post("/v1/completions", json=COMPLETION, headers=tenant.headers)
        assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
    fake_engine.raise_on_submit = None
    assert (await client.post("/v1/completions", json=COMPLETION, headers=tenant.headers)).status_code == 200


def test_prefix_count_and_storage_limits(api: Api) -> None:
    tenant_id, key = api.tenant("acme")
    small = native_bytes(api.spec, 2, seed=1)
    r = api.client.put(f"/admin/tenants/{tenant_id}/limits", headers=API_ADMIN,
                       json={"max_prefixes": 1, "max_stored_bytes": 3 * len(small)})
    assert r.status_code == 200, r.text
    assert api.upload(key, "a", small).status_code == 201
    assert api.upload(key, "a", native_bytes(api.spec, 2, seed=2)).status_code == 201  # a new version
    r = api.upload(key, "b", small)
    assert r.status_code == 429 and "max_prefixes limit of 1 reached" in r.json()["error"]["message"]
    assert api.prefix_rows() == (1, 2) and len(api.blob_files()) == 2  # nothing of `b` stored
    r = api.upload(key, "a", native_bytes(api.spec, 4, seed=3))
    assert r.status_code == 429 and "max_stored_bytes" in r.json()["error"]["message"]
    assert r.headers["retry-after"] == "60"
    assert api.prefix_rows() == (1, 2) and len(api.blob_files()) == 2
    assert api.client.delete("/v1/prefixes/a@1", headers=bearer(key)).status_code == 200
    assert api.upload(key, "a", native_bytes(api.spec, 2, seed=3)).status_code == 201  # room again


# ---- Redis: counters shared by replicas, and failing open when Redis is down ------------------------------------
def _app(tmp_path: Path, fake: FakeEngineClient, **overrides: Any) -> Any:
    settings = Settings(data_dir=tmp_path / "data", admin_key=ADMIN_KEY, **overrides)

    def factory(s: Settings) -> Runtime:
        return replace(open_runtime(s, load_model=False), engine_client=fake)

    return with_fake_model(create_app(settings, runtime_factory=factory))


@asynccontextmanager
async def _client_on(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


async def test_replicas_share_limits_through_redis(tmp_path: Path, redis_url: str) -> None:
    """Two app replicas on one database and one Redis: the minute's requests are counted once for both."""
    from app.db.migrate import upgrade

    fake = FakeEngineClient()
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    upgrade(db)
    one = _app(tmp_path / "one", fake, redis_url=redis_url, database_url=db, tenant_requests_per_minute=4)
    two = _app(tmp_path / "two", fake, redis_url=redis_url, database_url=db, tenant_requests_per_minute=4)
    async with _client_on(one) as c1, _client_on(two) as c2:
        r = await c1.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN)
        key = {"Authorization": f"Bearer {r.json()['api_key']}"}
        statuses = [(await c.get("/v1/models", headers=key)).status_code for c in (c1, c2, c1, c2, c1, c2)]
        assert statuses == [200, 200, 200, 200, 429, 429]


async def test_redis_down_serves_without_limits(tmp_path: Path) -> None:
    fake = FakeEngineClient()
    app = _app(tmp_path, fake, redis_url="redis://127.0.0.1:1/0", tenant_requests_per_minute=1,
               tenant_max_concurrent_requests=1)
    async with _client_on(app) as client:
        r = await client.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN)
        key = {"Authorization": f"Bearer {r.json()['api_key']}"}
        for _ in range(3):  # over requests_per_minute=1, but the counters are unreachable: fail open
            assert (await client.post("/v1/completions", json=COMPLETION, headers=key)).status_code == 200
