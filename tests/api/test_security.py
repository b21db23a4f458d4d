"""Security: keys stored only as hashes; the admin key refused on every tenant route and tenant keys on every
admin route (both enumerated from the app, so new routes are covered); no key, prompt or uploaded content in
the logs across a request flow; CORS closed unless origins are configured."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from app.config import Settings
from app.db.models import ApiKey
from app.logs import JsonFormatter
from app.main import create_app
from app.runtime import Runtime, open_runtime
from app.services.access import authorize
from tests.api.conftest import ADMIN_KEY, AppEnv, TenantKey
from tests.api.fake_engine import FakeEngineClient, with_fake_model

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def _routes(app_env: AppEnv) -> list[tuple[str, str]]:
    """(method, path with dummy parameters) of every operation the app documents (probes excluded)."""
    out = []
    for path, ops in app_env.app.openapi()["paths"].items():
        if path not in PUBLIC:
            out += [(m.upper(), re.sub(r"\{[^}]+\}", "x1", path)) for m in sorted(ops)]
    return out


async def test_every_tenant_route_refuses_the_admin_key(client: httpx.AsyncClient, app_env: AppEnv) -> None:
    tenant_routes = [(m, p) for m, p in _routes(app_env) if not p.startswith("/admin")]
    assert len(tenant_routes) >= 20  # completions, chat, models, prefixes, files, fine-tuning, users, ...
    for method, path in tenant_routes:
        r = await client.request(method, path, headers=ADMIN, json={})
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert "admin key cannot access tenant data" in r.json()["error"]["message"]


async def test_every_admin_route_refuses_tenant_keys(client: httpx.AsyncClient, app_env: AppEnv,
                                                     tenant: TenantKey) -> None:
    admin_routes = [(m, p) for m, p in _routes(app_env) if p.startswith("/admin")]
    assert len(admin_routes) >= 8
    for method, path in admin_routes:
        r = await client.request(method, path, headers=tenant.headers, json={"name": "x", "scopes": ["manage"]})
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        r = await client.request(method, path, json={})
        assert r.status_code == 401, (method, path, r.status_code)


async def test_keys_are_stored_only_as_hashes(client: httpx.AsyncClient, app_env: AppEnv) -> None:
    created = (await client.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN)).json()
    second = (await client.post(f"/admin/tenants/{created['id']}/keys", json={"scopes": ["inference"]},
                                headers=ADMIN)).json()
    keys = [created["api_key"], second["key"]]
    with app_env.sessions() as s:
        rows = s.execute(sa.select(ApiKey)).scalars().all()
        assert sorted(r.key_hash for r in rows) == sorted(hashlib.sha256(k.encode()).hexdigest() for k in keys)
    db_file = Path(app_env.settings.resolved_database_url.removeprefix("sqlite:///"))
    raw = b"".join(p.read_bytes() for p in db_file.parent.glob(db_file.name + "*"))  # the db, its WAL
    for k in keys:
        assert k.encode() not in raw
        assert k[:12].encode() not in raw  # not even a long prefix (only 8 characters are kept, for display)
    listed = (await client.get(f"/admin/tenants/{created['id']}/keys", headers=ADMIN)).text
    assert not any(k in listed for k in keys)


async def test_near_miss_keys_are_refused(client: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey) -> None:
    with app_env.sessions() as s:
        for near in (ADMIN_KEY[:-1], ADMIN_KEY + "x", ADMIN_KEY.upper(), tenant.key[:-1], tenant.key + " x"):
            assert authorize(s, raw_key=near, admin_key=ADMIN_KEY, settings=app_env.settings) is None, near
        assert authorize(s, raw_key=tenant.key, admin_key=ADMIN_KEY, settings=app_env.settings) is not None


async def test_no_keys_prompts_or_contents_in_logs(client: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    prompt, message, content = "PROMPT-7f3a secret plans", "MESSAGE-9c2e my password", "LINE-4d1b private"
    wrong_key = "psk-WRONG-not-a-real-key-0123456789"
    with caplog.at_level(logging.DEBUG):
        created = (await client.post("/admin/tenants", json={"name": "logged"}, headers=ADMIN)).json()
        key = {"Authorization": f"Bearer {created['api_key']}"}
        for body in ({"model": "fake-base", "prompt": prompt}, {"model": "fake-base", "prompt": prompt, "stream": True},
                     {"model": "nope", "prompt": prompt}):
            await client.post("/v1/completions", json=body, headers=key)
        await client.post("/v1/chat/completions", headers=tenant.headers,
                          json={"model": "fake-base", "messages": [{"role": "user", "content": message}]})
        line = json.dumps({"prompt": content, "completion": content})
        await client.post("/v1/files", headers=tenant.headers, data={"purpose": "fine-tune"},
                          files={"file": ("t.jsonl", line.encode() + b"\n", "application/jsonl")})
        await client.post("/v1/files", headers=tenant.headers, data={"purpose": "fine-tune"},
                          files={"file": ("t.jsonl", b"{" + content.encode() + b"\n", "application/jsonl")})
        await client.post("/v1/users/u1/examples", headers=tenant.headers,
                          json={"examples": [{"prompt": content, "completion": content}]})
        assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {wrong_key}"})).status_code == 401
    assert caplog.records, "the flow logged nothing: the check would be vacuous"
    fmt = JsonFormatter()
    text = "\n".join(fmt.format(r) for r in caplog.records)
    for secret in (ADMIN_KEY, created["api_key"], tenant.key, wrong_key, prompt, message, content):
        assert secret not in text, secret


# ---- CORS --------------------------------------------------------------------------------------------------------
def _app(tmp_path: Path, **overrides: object) -> object:
    def factory(s: Settings) -> Runtime:
        return replace(open_runtime(s, load_model=False), engine_client=FakeEngineClient())

    settings = Settings(data_dir=tmp_path / "data", admin_key=ADMIN_KEY, **overrides)  # type: ignore[arg-type]
    return with_fake_model(create_app(settings, runtime_factory=factory))


PREFLIGHT = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


async def test_cors_is_closed_by_default(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    r = await client.options("/v1/completions", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in r.headers
    r = await client.get("/v1/models", headers={**tenant.headers, "Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


async def test_cors_allows_only_configured_origins(tmp_path: Path) -> None:
    app = _app(tmp_path, cors_allow_origins="https://app.example, https://admin.example")
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app), httpx.AsyncClient(  # type: ignore[attr-defined]
            transport=transport, base_url="http://t") as c:
        ok = await c.options("/v1/completions", headers={**PREFLIGHT, "Origin": "https://app.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-credentials" not in ok.headers
        evil = await c.options("/v1/completions", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in evil.headers
