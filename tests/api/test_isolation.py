"""Tenant isolation, endpoint by endpoint: tenant B sees tenant A's objects exactly as missing ones (same
status, same body), and two tenants may each own a prefix with the same name."""

from __future__ import annotations

import pytest

from app.db.models import JobCheckpoint
from tests.api.fixtures_admin import ADMIN, Api, api_fixture, bearer, native_bytes  # noqa: F401
from tests.api.fixtures_training import create_job, file_id, pc, train_api_fixture  # noqa: F401

pytestmark = pytest.mark.both_databases  # the requests reach the database: run on both

# (method, path template) of every prefix endpoint that names a prefix; {ref} is the prefix reference.
PREFIX_ENDPOINTS = [
    ("GET", "/v1/prefixes/{ref}"),
    ("GET", "/v1/prefixes/{ref}/download"),
    ("GET", "/v1/prefixes/{ref}/download?format=peft"),
    ("DELETE", "/v1/prefixes/{ref}"),
]


@pytest.fixture
def two(api: Api) -> tuple[Api, str, str]:
    """Tenant A owns `secret` (2 versions); tenant B owns nothing. Returns (api, key A, key B)."""
    _, a = api.tenant("a")
    _, b = api.tenant("b")
    assert api.upload(a, "secret", native_bytes(api.spec, seed=1)).status_code == 201
    assert api.upload(a, "secret", native_bytes(api.spec, seed=2)).status_code == 201
    return api, a, b


@pytest.mark.parametrize(("method", "template"), PREFIX_ENDPOINTS)
@pytest.mark.parametrize("ref", ["secret", "secret@1"])
def test_other_tenants_prefix_is_answered_as_missing(two: tuple[Api, str, str], method: str, template: str,
                                                     ref: str) -> None:
    api, a, b = two
    theirs = api.client.request(method, template.format(ref=ref), headers=bearer(b))
    missing = api.client.request(method, template.format(ref=ref.replace("secret", "nothing")),
                                 headers=bearer(b))
    assert theirs.status_code == 404
    expected = missing.json()["error"]
    expected["message"] = expected["message"].replace("nothing", "secret")
    assert theirs.json() == {"error": expected}
    # A's prefix is untouched (B's DELETE did nothing) and A still sees it.
    assert api.client.get("/v1/prefixes/secret", headers=bearer(a)).json()["latest_version"] == 2


def test_list_shows_only_own_prefixes_and_names_do_not_clash(two: tuple[Api, str, str]) -> None:
    api, a, b = two
    assert api.client.get("/v1/prefixes", headers=bearer(b)).json()["data"] == []
    # B may use the same name: its own version 1, not A's version 3.
    r = api.upload(b, "secret", native_bytes(api.spec, seed=9))
    assert r.status_code == 201 and r.json()["version"] == 1
    a_info = api.client.get("/v1/prefixes/secret", headers=bearer(a)).json()
    b_info = api.client.get("/v1/prefixes/secret", headers=bearer(b)).json()
    assert a_info["id"] != b_info["id"] and (a_info["latest_version"], b_info["latest_version"]) == (2, 1)
    assert [p["name"] for p in api.client.get("/v1/prefixes", headers=bearer(b)).json()["data"]] == ["secret"]
    # Deleting B's leaves A's.
    assert api.client.delete("/v1/prefixes/secret", headers=bearer(b)).status_code == 200
    assert api.client.get("/v1/prefixes/secret", headers=bearer(a)).status_code == 200
    got = api.client.get("/v1/prefixes/secret@1/download", headers=bearer(a))
    assert got.content == native_bytes(api.spec, seed=1)


def test_uploading_a_taken_name_adds_to_own_prefix_only(two: tuple[Api, str, str]) -> None:
    api, a, b = two
    api.upload(b, "secret", native_bytes(api.spec, seed=9))
    assert api.client.get("/v1/prefixes/secret", headers=bearer(a)).json()["latest_version"] == 2


def test_keys_belong_to_their_tenant(api: Api) -> None:
    a_id, a = api.tenant("a")
    b_id, b = api.tenant("b")
    r = api.client.post(f"/admin/tenants/{a_id}/keys", json={"scopes": ["manage"]}, headers=ADMIN)
    a2 = r.json()
    assert a2["tenant_id"] == a_id
    api.upload(a2["key"], "p", native_bytes(api.spec))
    assert api.client.get("/v1/prefixes/p", headers=bearer(a)).status_code == 200  # same tenant
    assert api.client.get("/v1/prefixes/p", headers=bearer(b)).status_code == 404
    # Revoking A's second key leaves A's first key and B's key working.
    api.client.delete(f"/admin/keys/{a2['id']}", headers=ADMIN)
    assert api.client.get("/v1/prefixes", headers=bearer(a2["key"])).status_code == 401
    assert api.client.get("/v1/prefixes", headers=bearer(a)).status_code == 200
    assert api.client.get("/v1/prefixes", headers=bearer(b)).status_code == 200
    # Tenant keys cannot list or manage other tenants' keys (admin only).
    for method, path in [("GET", f"/admin/tenants/{b_id}/keys"), ("POST", f"/admin/tenants/{b_id}/keys"),
                         ("DELETE", f"/admin/keys/{a2['id']}"), ("DELETE", f"/admin/tenants/{b_id}")]:
        r = api.client.request(method, path, headers=bearer(a), json={"scopes": ["manage"]})
        assert r.status_code == 403, (method, path)
    assert len(api.client.get("/admin/tenants", headers=ADMIN).json()["data"]) == 2


def test_completions_cannot_use_another_tenants_prefix(two: tuple[Api, str, str]) -> None:
    api, a, b = two
    body = {"prompt": "hi", "max_tokens": 2}
    theirs = api.client.post("/v1/completions", headers=bearer(b), json={**body, "model": "secret"})
    missing = api.client.post("/v1/completions", headers=bearer(b), json={**body, "model": "nothing"})
    assert theirs.status_code == missing.status_code == 404
    expected = missing.json()["error"]["message"].replace("nothing", "secret")
    assert theirs.json()["error"]["message"] == expected
    assert theirs.json()["error"]["type"] == missing.json()["error"]["type"]
    own = api.client.post("/v1/completions", headers=bearer(a), json={**body, "model": "secret"})
    assert own.status_code == 200, own.text


# ---- files, fine-tuning jobs, end users ------------------------------------------------------------------------
MISSING = {"file": "file-000000000000000000000000", "job": "ftjob-000000000000000000000000", "user": "nobody"}
# (method, path template) of every endpoint that names a file, a job or an end user.
TRAINING_ENDPOINTS = [
    ("GET", "/v1/files/{file}"),
    ("GET", "/v1/files/{file}/content"),
    ("DELETE", "/v1/files/{file}"),
    ("GET", "/v1/files?after={file}"),
    ("GET", "/v1/fine_tuning/jobs/{job}"),
    ("POST", "/v1/fine_tuning/jobs/{job}/cancel"),
    ("GET", "/v1/fine_tuning/jobs/{job}/events"),
    ("GET", "/v1/fine_tuning/jobs/{job}/events?stream=true"),
    ("GET", "/v1/fine_tuning/jobs/{job}/checkpoints"),
    ("GET", "/v1/fine_tuning/jobs?after={job}"),
    ("GET", "/v1/users/{user}"),
    ("POST", "/v1/users/{user}/personalize"),
    ("DELETE", "/v1/users/{user}"),
]


@pytest.fixture
def owned(train_api: Api) -> tuple[Api, str, str, dict[str, str]]:
    """Tenant A owns a file, a queued job on it (with a checkpoint) and an end user `ann` with examples; tenant
    B owns nothing. Returns (api, key A, key B, A's ids by kind)."""
    api = train_api
    _, a = api.tenant("a")
    _, b = api.tenant("b")
    file = file_id(api, a)
    job = create_job(api, a, training_file=file, suffix="secret").json()["id"]
    with api.runtime.sessions() as s:
        s.add(JobCheckpoint(job_id=job, step=1, sha256="0" * 64, metrics={}))
        s.commit()
    r = api.client.post("/v1/users/ann/examples", headers=bearer(a), json={"examples": [pc(0)]})
    assert r.status_code == 201
    return api, a, b, {"file": file, "job": job, "user": "ann"}


@pytest.mark.parametrize(("method", "template"), TRAINING_ENDPOINTS)
def test_other_tenants_files_jobs_and_users_are_answered_as_missing(
        owned: tuple[Api, str, str, dict[str, str]], method: str, template: str) -> None:
    api, a, b, ids = owned
    theirs = api.client.request(method, template.format(**ids), headers=bearer(b))
    missing = api.client.request(method, template.format(**MISSING), headers=bearer(b))
    assert theirs.status_code in (400, 404), theirs.text
    assert theirs.status_code == missing.status_code
    body = theirs.text
    for kind, own_id in ids.items():
        body = body.replace(own_id, MISSING[kind])
    assert body == missing.text
    # A's objects are untouched (B's DELETE, cancel and personalize did nothing) and A still sees them.
    assert api.client.get(f"/v1/files/{ids['file']}/content", headers=bearer(a)).status_code == 200
    job = api.client.get(f"/v1/fine_tuning/jobs/{ids['job']}", headers=bearer(a)).json()
    assert job["status"] == "queued"
    assert api.client.get("/v1/users/ann", headers=bearer(a)).json()["example_count"] == 1
    assert len(api.client.get("/v1/fine_tuning/jobs", headers=bearer(a)).json()["data"]) == 1


def test_references_to_another_tenants_objects_read_as_missing(
        owned: tuple[Api, str, str, dict[str, str]]) -> None:
    api, a, b, ids = owned
    assert api.upload(a, "secret-prefix", native_bytes(api.spec)).status_code == 201
    train = file_id(api, b)
    for field, own, absent in [("training_file", ids["file"], MISSING["file"]),
                               ("validation_file", ids["file"], MISSING["file"]),
                               ("warm_start", "secret-prefix", "nothing")]:
        body = {"training_file": train, field: own}
        theirs = create_job(api, b, **body)
        missing = create_job(api, b, **{**body, field: absent})
        assert theirs.status_code == missing.status_code == 400
        assert theirs.text.replace(own, absent) == missing.text
    r = api.client.post("/v1/users/ann/personalize", headers=bearer(b), json={"warm_start": "secret-prefix"})
    assert r.status_code == 404  # B has no user `ann`


def test_lists_and_users_are_per_tenant(owned: tuple[Api, str, str, dict[str, str]]) -> None:
    api, a, b, _ = owned
    for path in ("/v1/files", "/v1/fine_tuning/jobs"):
        assert api.client.get(path, headers=bearer(b)).json()["data"] == []
    # B's `ann` is B's own user: posting examples for it does not touch A's.
    r = api.client.post("/v1/users/ann/examples", headers=bearer(b), json={"examples": [pc(1), pc(2)]})
    assert r.status_code == 201 and r.json()["example_count"] == 2
    assert api.client.get("/v1/users/ann", headers=bearer(a)).json()["example_count"] == 1
    assert api.client.delete("/v1/users/ann", headers=bearer(b)).json()["examples_deleted"] == 2
    assert api.client.get("/v1/users/ann", headers=bearer(a)).json()["example_count"] == 1
    # The same suffix in two tenants does not clash.
    assert create_job(api, b, training_file=file_id(api, b), suffix="secret").status_code == 200


# ---- every endpoint is covered ---------------------------------------------------------------------------------
# Operations that name a tenant's object but are checked elsewhere, with where.
COVERED_ELSEWHERE = {
    ("GET", "/v1/models/{}"): "tests/api/test_models.py::test_retrieve (another tenant's prefix is a 404)",
    ("POST", "/v1/users/{}/examples"): "test_lists_and_users_are_per_tenant (B's `ann` is B's own user)",
    ("GET", "/v1/batches/{}"): "test_batches.py::test_another_tenants_batch_and_files_answer_like_missing_ones",
    ("POST", "/v1/batches/{}/cancel"): "test_batches.py::test_another_tenants_batch_and_files_answer_like_missing_ones",
}


def _shape(template: str) -> str:
    """`/v1/files/{file}/content?x=1` -> `/v1/files/{}/content`: compare templates whatever the names."""
    path = template.split("?", 1)[0]
    return "/".join("{}" if part.startswith("{") else part for part in path.split("/"))


def test_every_tenant_endpoint_naming_an_object_is_in_the_isolation_suite(api: Api) -> None:
    """A new endpoint that takes an object id must join the lists above (or COVERED_ELSEWHERE)."""
    doc = api.client.app.openapi()  # type: ignore[attr-defined]
    documented = {(m.upper(), _shape(p)) for p, ops in doc["paths"].items() for m in ops
                  if "{" in p and not p.startswith("/admin")}
    covered = {(m, _shape(t)) for m, t in PREFIX_ENDPOINTS + TRAINING_ENDPOINTS} | set(COVERED_ELSEWHERE)
    assert documented - covered == set()


def test_limits_are_per_tenant(api: Api) -> None:
    """One tenant's limits and usage do not touch another's (the admin sets them per tenant id)."""
    a_id, a = api.tenant("a")
    b_id, b = api.tenant("b")
    r = api.client.put(f"/admin/tenants/{a_id}/limits", headers=ADMIN, json={"requests_per_minute": 1})
    assert r.status_code == 200
    assert api.client.get("/v1/prefixes", headers=bearer(a)).status_code == 200
    assert api.client.get("/v1/prefixes", headers=bearer(a)).status_code == 429
    assert all(api.client.get("/v1/prefixes", headers=bearer(b)).status_code == 200 for _ in range(3))
    b_limits = api.client.get(f"/admin/tenants/{b_id}/limits", headers=ADMIN).json()
    assert b_limits["configured"]["requests_per_minute"] is None
