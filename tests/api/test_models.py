"""GET /v1/models and /v1/models/{model}: the base model and the caller's prefixes only."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import httpx

from tests.api.conftest import ADMIN_KEY, AppEnv, TenantKey


async def test_list(client: httpx.AsyncClient, tenant: TenantKey, make_tenant: Callable[..., TenantKey],
                    insert_prefix: Callable[..., str], app_env: AppEnv) -> None:
    from app.db.models import EndUser, Prefix

    insert_prefix(tenant.tenant_id, "zeta", versions=3)
    insert_prefix(tenant.tenant_id, "alpha")
    with app_env.sessions() as s:
        user = EndUser(tenant_id=tenant.tenant_id, external_id="bob")
        s.add(user)
        s.add(Prefix(tenant_id=tenant.tenant_id, name="empty"))  # no version yet: not servable, not listed
        s.commit()
        uid = user.id
    insert_prefix(tenant.tenant_id, "user:bob", end_user_id=uid)
    insert_prefix(make_tenant("other").tenant_id, "hidden")
    r = await client.get("/v1/models", headers=tenant.headers)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake-base", "alpha", "user:bob", "zeta"]
    base, *prefixes = body["data"]
    assert base["object"] == "model" and base["parent"] is None and base["owned_by"] == "system"
    for m in prefixes:
        assert list(m) == ["id", "object", "created", "owned_by", "parent", "kind"]
        assert m["kind"] == "prefix_tuning"
        assert m["parent"] == "fake-base" and m["owned_by"] == tenant.tenant_id and m["created"] > 0


async def test_retrieve(client: httpx.AsyncClient, tenant: TenantKey, make_tenant: Callable[..., TenantKey],
                        insert_prefix: Callable[..., str]) -> None:
    insert_prefix(tenant.tenant_id, "p", versions=2)
    insert_prefix(make_tenant("other").tenant_id, "q")
    for model in ("fake-base", "p", "p@2"):
        r = await client.get(f"/v1/models/{model}", headers=tenant.headers)
        assert r.status_code == 200 and r.json()["id"] == model
    theirs = await client.get("/v1/models/q", headers=tenant.headers)
    missing = await client.get("/v1/models/x", headers=tenant.headers)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.text == missing.text.replace("`x`", "`q`")
    assert (await client.get("/v1/models/p@3", headers=tenant.headers)).status_code == 404


async def test_auth(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models")).status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (await client.get("/v1/models", headers=admin)).status_code == 403


def test_web_layer_imports_no_torch() -> None:
    """app.main, the routes, protocol and the inference services import without torch or transformers."""
    code = (
        "import sys, app.main, app.api.routes.completions, app.api.routes.chat, app.api.routes.models, "
        "app.protocol.completions, app.protocol.chat, app.protocol.models, app.services.targets, "
        "app.services.generation, app.services.completions, app.services.chat, app.services.models\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
