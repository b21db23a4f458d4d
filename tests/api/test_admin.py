"""Admin API: tenants and keys, against the real app (SQLite, blob directory, tiny random model)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.db.models import ApiKey, Prefix, Tenant
from tests.api.fixtures_admin import ADMIN, Api, api_fixture, bearer, native_bytes  # noqa: F401

pytestmark = pytest.mark.both_databases  # the requests reach the database: run on both


def test_create_list_and_duplicate_tenant(api: Api) -> None:
    r = api.client.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN)
    assert r.status_code == 201
    body = r.json()
    assert body["id"].startswith("ten_") and body["name"] == "acme" and body["api_key"].startswith("psk-")
    # The first key holds inference + manage.
    listed = api.client.get("/v1/prefixes", headers=bearer(body["api_key"])).json()
    assert listed == {"object": "list", "data": []}
    dup = api.client.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN)
    assert dup.status_code == 409 and "already exists" in dup.json()["error"]["message"]
    listed = api.client.get("/admin/tenants", headers=ADMIN).json()["data"]
    assert [t["name"] for t in listed] == ["acme"]
    keys = api.client.get(f"/admin/tenants/{body['id']}/keys", headers=ADMIN).json()["data"]
    assert [(k["id"], k["scopes"], k["revoked_at"]) for k in keys] == [
        (body["api_key_id"], ["inference", "manage"], None)]
    assert "key_hash" not in keys[0] and body["api_key"] not in r.text.replace(body["api_key"], "", 1)


def test_admin_endpoints_need_the_admin_key(api: Api) -> None:
    _, key = api.tenant("acme")
    assert api.client.get("/admin/tenants").status_code == 401
    assert api.client.get("/admin/tenants", headers=bearer("wrong")).status_code == 401
    r = api.client.get("/admin/tenants", headers=bearer(key))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert api.client.post("/admin/tenants", json={"name": "x"}, headers=bearer(key)).status_code == 403
    # ...and the admin key is not a tenant.
    assert api.client.get("/v1/prefixes", headers=ADMIN).status_code == 403


def test_bad_tenant_and_key_bodies(api: Api) -> None:
    tid, _ = api.tenant("acme")
    for body in ({}, {"name": ""}, {"name": "x" * 201}):
        r = api.client.post("/admin/tenants", json=body, headers=ADMIN)
        assert r.status_code == 400, body
        assert r.json()["error"]["param"] == "name"
    for body in ({}, {"scopes": []}, {"scopes": ["root"]}, {"scopes": "inference"}):
        r = api.client.post(f"/admin/tenants/{tid}/keys", json=body, headers=ADMIN)
        assert r.status_code == 400, body
    r = api.client.post("/admin/tenants/ten_missing/keys", json={"scopes": ["inference"]}, headers=ADMIN)
    assert r.status_code == 404
    assert api.client.delete("/admin/tenants/ten_missing", headers=ADMIN).status_code == 404
    assert api.client.delete("/admin/keys/key_missing", headers=ADMIN).status_code == 404


def test_scoped_key_and_revocation(api: Api) -> None:
    tid, _ = api.tenant("acme")
    r = api.client.post(f"/admin/tenants/{tid}/keys", json={"scopes": ["inference"]}, headers=ADMIN)
    assert r.status_code == 201
    created = r.json()
    assert created["scopes"] == ["inference"] and created["tenant_id"] == tid
    denied = api.client.get("/v1/prefixes", headers=bearer(created["key"]))
    assert denied.status_code == 403 and "manage" in denied.json()["error"]["message"]

    r = api.client.post(f"/admin/tenants/{tid}/keys", json={"scopes": ["manage"]}, headers=ADMIN)
    manage = r.json()
    assert api.client.get("/v1/prefixes", headers=bearer(manage["key"])).status_code == 200
    revoked = api.client.delete(f"/admin/keys/{manage['id']}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    # Effective at once, and revoking twice keeps the first time.
    assert api.client.get("/v1/prefixes", headers=bearer(manage["key"])).status_code == 401
    again = api.client.delete(f"/admin/keys/{manage['id']}", headers=ADMIN).json()
    assert again["revoked_at"] == revoked.json()["revoked_at"]


def test_delete_tenant_removes_everything_it_owns(api: Api) -> None:
    a_id, a_key = api.tenant("a")
    b_id, b_key = api.tenant("b")
    shared = native_bytes(api.spec, seed=1)
    assert api.upload(a_key, "shared", shared).status_code == 201
    assert api.upload(b_key, "same-bytes", shared).status_code == 201
    assert api.upload(a_key, "own", native_bytes(api.spec, seed=2)).status_code == 201
    assert len(api.blob_files()) == 2  # content-addressed: the shared bytes are one blob
    resolver = api.runtime.resolver
    assert resolver is not None
    resolver.get(a_id, "own")  # warm the device pool and the cache tier
    assert len(resolver.pool) == 1

    r = api.client.delete(f"/admin/tenants/{a_id}", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"id": a_id, "object": "tenant", "deleted": True}
    assert len(resolver.pool) == 0
    assert len(api.blob_files()) == 1  # B still references the shared blob
    assert api.client.get("/v1/prefixes", headers=bearer(a_key)).status_code == 401
    with api.runtime.sessions() as s:
        for model in (Tenant, ApiKey, Prefix):
            assert s.scalar(sa.select(sa.func.count()).select_from(model).where(model.tenant_id == a_id
                            if model is not Tenant else Tenant.id == a_id)) == 0
    got = api.client.get("/v1/prefixes/same-bytes/download", headers=bearer(b_key))
    assert got.status_code == 200 and got.content == shared
    assert [t["id"] for t in api.client.get("/admin/tenants", headers=ADMIN).json()["data"]] == [b_id]
