"""An exhausted database pool is shed at once with a 503 that carries `Retry-After`, and serving resumes as soon as
a connection frees up."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from app.config import Settings
from tests.api.conftest import AppEnv, TenantKey
from tests.api.test_hot_path import one_connection, runtime_of_env

pytestmark = pytest.mark.both_databases  # the requests reach the database: run on both


@pytest.fixture
def settings(tmp_path: Path, api_database_url: str | None) -> Settings:
    return one_connection(tmp_path, api_database_url, wait_s=1.0)  # the default wait


async def test_an_exhausted_pool_is_a_503_with_retry_after_then_serving_resumes(
        client: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey) -> None:
    runtime = runtime_of_env(app_env)
    body = {"model": "fake-base", "prompt": "x"}
    with runtime.db.connect() as held:  # the pool's only connection
        held.execute(sa.text("SELECT 1"))
        r = await client.post("/v1/completions", json=body, headers=tenant.headers)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "database_busy"
        listed = await client.get("/v1/prefixes", headers=tenant.headers)  # a route with its own session
        assert listed.status_code == 503 and listed.headers["retry-after"] == "1"
    r = await client.post("/v1/completions", json=body, headers=tenant.headers)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "hello world"
