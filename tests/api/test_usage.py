"""`GET /v1/usage`: the calling tenant's limits beside its current use, read from the same counters and queries
the limits are enforced with (in-process counters here, real Redis in the last test)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from tests.api.conftest import ADMIN_KEY, TenantKey
from tests.api.fake_engine import FakeEngineClient
from tests.api.test_limits import COMPLETION, _app, _client_on, assert_limited, put_limits
from tests.engine.helpers import until

pytestmark = pytest.mark.both_databases  # the usage queries reach the database: run on both

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def usage_of(client: httpx.AsyncClient, tenant: TenantKey) -> dict[str, Any]:
    r = await client.get("/v1/usage", headers=tenant.headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["object"] == "tenant.usage" and body["tenant_id"] == tenant.tenant_id
    return body


async def test_usage_counts_what_the_limits_count(client: httpx.AsyncClient, make_tenant: Callable[..., TenantKey],
                                                  insert_prefix: Callable[..., str], settings: Settings) -> None:
    a, b = make_tenant("a"), make_tenant("b")
    fresh = await usage_of(client, a)
    assert fresh["limits"]["requests_per_minute"] == settings.tenant_requests_per_minute
    assert fresh["usage"]["requests_per_minute"] == 1  # this request itself
    assert fresh["usage"]["tokens_per_minute"] == 0 and fresh["usage"]["max_prefixes"] == 0
    # The fake engine generates 12 tokens (`hello world` + EOS) per choice: 2 requests, 3 choices.
    for n in (1, 2):
        r = await client.post("/v1/completions", json={**COMPLETION, "n": n}, headers=a.headers)
        assert r.status_code == 200, r.text
    examples = [{"prompt": "hi", "completion": f" {i}"} for i in range(3)]
    r = await client.post("/v1/users/ann/examples", json={"examples": examples}, headers=a.headers)
    assert r.status_code == 201, r.text
    insert_prefix(a.tenant_id, "bot", versions=2)
    insert_prefix(a.tenant_id, "faq")
    now = await usage_of(client, a)
    assert now["usage"]["requests_per_minute"] == 5 and now["usage"]["tokens_per_minute"] == 36
    assert now["usage"]["max_examples_per_user"] == 3
    assert now["usage"]["max_prefixes"] == 2 and now["usage"]["max_stored_bytes"] == 3  # 1 byte a version row
    assert now["usage"]["max_concurrent_requests"] == 0 and now["usage"]["max_concurrent_jobs"] == 0
    assert 0 <= now["window_resets_in_s"] <= 60
    # The other tenant's counters and rows are its own.
    other = await usage_of(client, b)
    assert other["usage"]["requests_per_minute"] == 1 and other["usage"]["tokens_per_minute"] == 0
    assert other["usage"]["max_prefixes"] == 0 and other["usage"]["max_stored_bytes"] == 0


async def test_usage_reaches_the_limit_the_check_refuses_at(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    await put_limits(client, tenant.tenant_id, requests_per_minute=3)
    body = await usage_of(client, tenant)
    assert body["limits"]["requests_per_minute"] == 3 and body["usage"]["requests_per_minute"] == 1
    await usage_of(client, tenant)
    assert (await usage_of(client, tenant))["usage"]["requests_per_minute"] == 3
    assert_limited(await client.get("/v1/models", headers=tenant.headers), "requests_per_minute", 3)


UNLIMITED = {"requests_per_minute": None, "tokens_per_minute": None, "max_concurrent_requests": None}


@pytest.fixture
def settings(tmp_path: Path, api_database_url: str | None, request: pytest.FixtureRequest) -> Settings:
    """tests/api/conftest.py's settings, with the `tenant_*` defaults a test passes as its parameter."""
    defaults = {f"tenant_{k}": v for k, v in getattr(request, "param", {}).items()}
    return Settings(data_dir=tmp_path / "data", admin_key=ADMIN_KEY, database_url=api_database_url, **defaults)


@pytest.mark.parametrize("settings", [UNLIMITED], indirect=True)
async def test_unlimited_rates_are_not_counted(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    """A limit that is null (the default, and the tenant's own) is never counted: its use reads as null."""
    limits = UNLIMITED
    body = await usage_of(client, tenant)
    assert {k: body["limits"][k] for k in limits} == limits
    assert {k: body["usage"][k] for k in limits} == limits
    assert body["window_resets_in_s"] is None


async def test_requests_in_flight(client: httpx.AsyncClient, tenant: TenantKey, fake_engine: FakeEngineClient) -> None:
    fake_engine.hold_after_first = held = asyncio.Event()
    first = asyncio.create_task(client.post("/v1/completions", json=COMPLETION, headers=tenant.headers))
    await until(lambda: len(fake_engine.calls) == 1 and fake_engine.calls[0].first_sent, "generating")
    assert (await usage_of(client, tenant))["usage"]["max_concurrent_requests"] == 1
    held.set()
    assert (await first).status_code == 200
    assert (await usage_of(client, tenant))["usage"]["max_concurrent_requests"] == 0


async def test_usage_needs_a_tenant_key(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/usage")).status_code == 401
    r = await client.get("/v1/usage", headers=ADMIN)
    assert r.status_code == 403 and "admin key cannot access tenant data" in r.json()["error"]["message"]


async def test_usage_in_openapi(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    ok = doc["paths"]["/v1/usage"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/TenantUsage")
    assert set(doc["components"]["schemas"]["UsageValues"]["properties"]) == set(
        doc["components"]["schemas"]["TenantLimitValues"]["properties"])


async def test_usage_reads_the_counters_replicas_share(tmp_path: Path, redis_url: str) -> None:
    """Two replicas on one Redis: one replica's usage shows the requests and tokens counted on the other."""
    from app.db.migrate import upgrade
    from app.db.models import ApiKey, Tenant
    from app.db.session import make_engine, make_session_factory
    from app.services.auth import generate_key, hash_key

    fake = FakeEngineClient()
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    upgrade(db)
    key = generate_key()
    with make_session_factory(make_engine(db))() as s:
        row = Tenant(name="acme")
        s.add(row)
        s.flush()
        s.add(ApiKey(tenant_id=row.id, key_hash=hash_key(key), key_prefix=key[:8], scopes="inference,manage"))
        s.commit()
        tenant = TenantKey(row.id, key)
    one = _app(tmp_path / "one", fake, redis_url=redis_url, database_url=db)
    two = _app(tmp_path / "two", fake, redis_url=redis_url, database_url=db)
    async with _client_on(one) as a, _client_on(two) as b:
        for _ in range(2):
            assert (await a.post("/v1/completions", json=COMPLETION, headers=tenant.headers)).status_code == 200
        body = await usage_of(b, tenant)
    assert body["usage"]["requests_per_minute"] == 3 and body["usage"]["tokens_per_minute"] == 24
