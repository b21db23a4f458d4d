"""Personalization API on the real app (SQLite and PostgreSQL), no worker: examples (validated, all or nothing,
per-user limit), the user's state, personalization jobs (warm start from the personal prefix by default), the
personal prefix served as `user:<id>`, and erasing a user everywhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from app.db.models import EndUser, JobCheckpoint, Prefix, PrefixVersion, TrainingJob, UserExample
from app.jobs.data_defaults import data_defaults
from app.jobs.job_config import config_from_job
from tests.api.fixtures_admin import Api, bearer, native_bytes
from tests.api.fixtures_training import (  # noqa: F401
    CONTEXT,
    pc,
    queue_of,
    rows,
    run_train_api,
    set_status,
    train_api_fixture,
)

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, Ann!"}]}


def post_examples(api: Api, key: str, user: str, examples: list[Any]) -> Any:
    return api.client.post(f"/v1/users/{user}/examples", headers=bearer(key), json={"examples": examples})


def personalize(api: Api, key: str, user: str, **body: Any) -> Any:
    return api.client.post(f"/v1/users/{user}/personalize", headers=bearer(key), json=body)


def store_personal_prefix(api: Api, tenant_id: str, user: str, p: int = 4) -> str:
    """A personal prefix version for `user` as a worker publishes it (blob, then rows); returns the prefix id."""
    data = native_bytes(api.spec, p, seed=5)
    sha = api.runtime.blobs.put(data)
    with api.runtime.sessions() as s:
        end_user = s.execute(sa.select(EndUser).where(EndUser.external_id == user,
                                                      EndUser.tenant_id == tenant_id)).scalar_one()
        prefix = Prefix(tenant_id=tenant_id, name=f"user:{user}", end_user_id=end_user.id)
        s.add(prefix)
        s.flush()
        s.add(PrefixVersion(prefix_id=prefix.id, version=1, sha256=sha, size_bytes=len(data), num_virtual_tokens=p,
                            source_format="trained", base_model_fingerprint=api.spec.fingerprint))
        s.commit()
        return prefix.id


def test_list_users_pages_newest_first_and_only_the_tenants(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    _, other = api.tenant("globex")
    for user in ("ann", "bob", "cid"):
        assert post_examples(api, key, user, [pc(0), pc(1)]).status_code == 201
    assert post_examples(api, other, "eve", [pc(0)]).status_code == 201
    post_examples(api, key, "ann", [pc(2)])  # more examples do not make a user newer

    first = api.client.get("/v1/users", headers=bearer(key), params={"limit": 2}).json()
    assert [u["id"] for u in first["data"]] == ["cid", "bob"] and first["has_more"] is True
    assert first["object"] == "list" and first["last_id"] == "bob"
    rest = api.client.get("/v1/users", headers=bearer(key), params={"limit": 2, "after": "bob"}).json()
    assert [(u["id"], u["example_count"]) for u in rest["data"]] == [("ann", 3)] and rest["has_more"] is False
    assert rest["data"][0] == api.client.get("/v1/users/ann", headers=bearer(key)).json()

    # Another tenant's user is not listed, and as a cursor it is refused like an id that never existed.
    assert [u["id"] for u in api.client.get("/v1/users", headers=bearer(other)).json()["data"]] == ["eve"]
    foreign = api.client.get("/v1/users", headers=bearer(key), params={"after": "eve"})
    missing = api.client.get("/v1/users", headers=bearer(key), params={"after": "nobody"})
    assert foreign.status_code == missing.status_code == 400
    assert foreign.json()["error"]["param"] == missing.json()["error"]["param"] == "after"


def test_list_users_reads_a_page_in_a_fixed_number_of_queries(train_api: Api) -> None:
    """Example counts, personal prefixes and last jobs come in one query each, whatever the page's size."""
    api = train_api
    tenant_id, key = api.tenant("acme")

    def statements(limit: int) -> int:
        seen: list[str] = []
        listen = lambda *a: seen.append(a[2])  # noqa: E731  # (conn, cursor, statement, ...)
        sa.event.listen(api.runtime.db, "before_cursor_execute", listen)
        try:
            page = api.client.get("/v1/users", headers=bearer(key), params={"limit": limit}).json()
        finally:
            sa.event.remove(api.runtime.db, "before_cursor_execute", listen)
        assert len(page["data"]) == limit and all(u["last_job"] and u["personal_prefix"] for u in page["data"])
        return len(seen)

    for user in ("ann", "bob", "cid", "dee"):
        post_examples(api, key, user, [pc(0), pc(1)])
        set_status(api, personalize(api, key, user, hyperparameters={"max_steps": 5}).json()["id"], "succeeded")
        store_personal_prefix(api, tenant_id, user)
    assert statements(1) == statements(4)


def test_user_state_names_a_soft_prompts_kind(train_api: Api) -> None:
    api = train_api
    tenant_id, key = api.tenant("acme")
    post_examples(api, key, "ann", [pc(0)])
    prefix_id = store_personal_prefix(api, tenant_id, "ann")
    with api.runtime.sessions() as s:  # as a personalize job with kind prompt_tuning publishes it
        s.execute(sa.update(PrefixVersion).where(PrefixVersion.prefix_id == prefix_id).values(kind="prompt_tuning"))
        s.commit()
    info = api.client.get("/v1/users/ann", headers=bearer(key)).json()
    assert info["personal_prefix"]["kind"] == "prompt_tuning"


def test_examples_and_user_state(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    assert api.client.get("/v1/users/ann", headers=bearer(key)).status_code == 404
    r = post_examples(api, key, "ann", [pc(0), CHAT])
    assert r.status_code == 201, r.text
    assert r.json() == {"object": "end_user.examples", "user": "ann", "added": 2, "example_count": 2}
    assert post_examples(api, key, "ann", [pc(1)]).json()["example_count"] == 3
    info = api.client.get("/v1/users/ann", headers=bearer(key)).json()
    assert (info["id"], info["object"], info["example_count"]) == ("ann", "end_user", 3)
    assert info["personal_prefix"] is None and info["last_job"] is None
    with api.runtime.sessions() as s:  # stored normalized, in the posted order
        data = s.execute(sa.select(UserExample.data).order_by(UserExample.created_at, UserExample.id)).scalars().all()
    assert data[0] == pc(0) and data[1]["messages"][1] == {"role": "assistant", "content": "Hello, Ann!", "weight": 1}
    assert data[2] == pc(1)


@pytest.mark.parametrize(("examples", "param", "fragment"), [
    ([pc(0), {"prompt": "x"}], "examples[1]", "missing `completion`"),
    (["text"], "examples[0]", "expected a JSON object, found a string"),
    ([pc(0), {"messages": [{"role": "user", "content": "only a question"}]}], "examples[1]", "no assistant turn"),
    ([{"prompt": "p" * CONTEXT, "completion": "c"}], "examples[0]", "at most"),
    ([], "examples", "at least 1 item"),
])
def test_bad_examples_store_nothing(train_api: Api, examples: list[Any], param: str, fragment: str) -> None:
    api = train_api
    _, key = api.tenant("acme")
    r = post_examples(api, key, "ann", examples)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and fragment in r.json()["error"]["message"]
    assert rows(api, EndUser) == 0 and rows(api, UserExample) == 0


@pytest.mark.parametrize("user", ["a b", "ann@12", "-ann", "x" * 129, "%C3%A9"])
def test_bad_user_ids(train_api: Api, user: str) -> None:
    api = train_api
    _, key = api.tenant("acme")
    r = post_examples(api, key, user, [pc(0)])
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_user_id"
    assert api.client.get(f"/v1/users/{user}", headers=bearer(key)).status_code == 400


@pytest.fixture
def limited_api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    yield from run_train_api(request, tmp_path, tenant_max_examples_per_user=3)


def test_examples_per_user_limit(limited_api: Api) -> None:
    api = limited_api
    _, key = api.tenant("acme")
    assert post_examples(api, key, "ann", [pc(0), pc(1)]).status_code == 201
    r = post_examples(api, key, "ann", [pc(2), pc(3)])
    assert r.status_code == 429 and "max_examples_per_user limit of 3" in r.json()["error"]["message"]
    r = post_examples(api, key, "bob", [pc(i) for i in range(4)])  # a new user over the limit is not created
    assert r.status_code == 429 and rows(api, EndUser) == 1 and rows(api, UserExample) == 2
    assert post_examples(api, key, "ann", [pc(2)]).json()["example_count"] == 3


def test_personalize_creates_a_job_on_the_users_examples(train_api: Api) -> None:
    api = train_api
    tenant_id, key = api.tenant("acme")
    post_examples(api, key, "ann", [pc(0), CHAT])
    r = personalize(api, key, "ann", seed=1, hyperparameters={"max_steps": 5})
    assert r.status_code == 200, r.text
    job = r.json()
    assert (job["status"], job["suffix"], job["user"], job["training_file"]) == ("queued", "user:ann", "ann", None)
    assert job["prefix_options"]["warm_start"] is None and queue_of(api).enqueued == [job["id"]]
    assert job["hyperparameters"]["max_steps"] == 5
    r = personalize(api, key, "ann")
    assert r.status_code == 409 and r.json()["error"]["code"] == "suffix_in_use"
    listed = api.client.get("/v1/fine_tuning/jobs", headers=bearer(key)).json()["data"]
    assert [j["id"] for j in listed] == [job["id"]]
    info = api.client.get("/v1/users/ann", headers=bearer(key)).json()
    assert info["last_job"]["id"] == job["id"] and info["last_job"]["status"] == "queued"

    # Once a personal prefix exists, the next job starts from it unless told otherwise.
    set_status(api, job["id"], "succeeded")
    store_personal_prefix(api, tenant_id, "ann")
    info = api.client.get("/v1/users/ann", headers=bearer(key)).json()
    assert info["personal_prefix"]["model"] == "user:ann" and info["personal_prefix"]["version"] == 1
    assert info["personal_prefix"]["kind"] == "prefix_tuning"
    second = personalize(api, key, "ann").json()
    assert second["prefix_options"] == {**second["prefix_options"], "warm_start": "user:ann@1",
                                        "num_virtual_tokens": 4}
    set_status(api, second["id"], "cancelled")
    scratch = personalize(api, key, "ann", warm_start=None).json()
    assert scratch["prefix_options"]["warm_start"] is None
    assert scratch["prefix_options"]["num_virtual_tokens"] == data_defaults(2).num_virtual_tokens  # 2 examples
    set_status(api, scratch["id"], "cancelled")
    api.upload(key, "house-style", native_bytes(api.spec, 6))
    tenant_start = personalize(api, key, "ann", warm_start="house-style").json()
    assert tenant_start["prefix_options"]["warm_start"] == "house-style@1"
    with api.runtime.sessions() as s:
        row = s.get(TrainingJob, tenant_start["id"])
        assert row is not None and config_from_job(row).num_virtual_tokens == 6


def test_personalize_refusals(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    r = personalize(api, key, "nobody")
    assert r.status_code == 404 and r.json()["error"]["param"] == "user_id"
    post_examples(api, key, "ann", [pc(0), {"prompt": "p" * (CONTEXT - 40), "completion": "c"}])
    r = personalize(api, key, "ann", num_virtual_tokens=64)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("user example 2: the example has")
    r = personalize(api, key, "ann", hyperparameters={"n_epochs": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "hyperparameters.n_epochs"
    r = personalize(api, key, "ann", warm_start="missing")
    assert r.status_code == 400 and r.json()["error"]["param"] == "warm_start"
    assert rows(api, TrainingJob) == 0
    assert api.client.post("/v1/users/ann/personalize", headers=bearer(key)).status_code == 200  # no body at all


def test_personal_prefix_is_served_and_deleting_the_user_erases_everything(train_api: Api) -> None:
    api = train_api
    tenant_id, key = api.tenant("acme")
    _, other_key = api.tenant("other")
    post_examples(api, key, "ann", [pc(0), pc(1)])
    post_examples(api, other_key, "ann", [pc(0)])  # another tenant's user of the same id is untouched
    done = personalize(api, key, "ann").json()
    with api.runtime.sessions() as s:  # a checkpoint of the user's job (trained on their data)
        ckpt = api.runtime.blobs.put(native_bytes(api.spec, 4, seed=9))
        s.add(JobCheckpoint(job_id=done["id"], step=5, sha256=ckpt, metrics={}))
        s.commit()
    set_status(api, done["id"], "succeeded")
    prefix_id = store_personal_prefix(api, tenant_id, "ann")
    running = personalize(api, key, "ann").json()
    set_status(api, running["id"], "running")

    body = {"model": "user:ann", "prompt": "name: N0 =>", "max_tokens": 4, "temperature": 0}
    r = api.client.post("/v1/completions", headers=bearer(key), json=body)
    assert r.status_code == 200, r.text
    assert api.runtime.resolver is not None and len(api.runtime.resolver.pool) == 1
    assert len(api.blob_files()) == 2

    r = api.client.delete("/v1/users/ann", headers=bearer(key))
    assert r.status_code == 200, r.text
    assert r.json() == {"id": "ann", "object": "end_user", "deleted": True, "examples_deleted": 2,
                        "prefix_versions_deleted": 1, "jobs_cancelled": 1}
    r = api.client.post("/v1/completions", headers=bearer(key), json=body)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert api.client.get("/v1/users/ann", headers=bearer(key)).status_code == 404
    assert api.blob_files() == [] and len(api.runtime.resolver.pool) == 0
    with api.runtime.sessions() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Prefix).where(Prefix.id == prefix_id)) == 0
        assert s.scalar(sa.select(sa.func.count()).select_from(JobCheckpoint)) == 0
        jobs = {j.id: j for j in s.execute(sa.select(TrainingJob)).scalars()}
    # The jobs stay as the tenant's record, without the user; the running one is asked to stop.
    assert jobs[running["id"]].cancel_requested and jobs[running["id"]].end_user_id is None
    assert api.client.get(f"/v1/fine_tuning/jobs/{done['id']}", headers=bearer(key)).json()["user"] is None
    assert rows(api, UserExample) == 1 and rows(api, EndUser) == 1  # the other tenant's
    assert api.client.get("/v1/users/ann", headers=bearer(other_key)).json()["example_count"] == 1
    assert api.client.delete("/v1/users/ann", headers=bearer(key)).status_code == 404
