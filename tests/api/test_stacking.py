"""Stacks of prefixes over HTTP (app/services/stacks.py): `model: "a+user:ann"` and the `prefixes` field name
the versions the engine gets, in order, resolved with the API key in one statement; missing or foreign parts
answer as a missing model; the limits and the base-version check; GET /v1/models/{stack}."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.db.models import EndUser, Prefix, PrefixVersion, TrainingJob
from app.services.stacks import StackLimits, split_stack
from app.services.targets import resolve_model
from tests.api.conftest import ADMIN_KEY, AppEnv, TenantKey
from tests.api.fake_engine import FAKE_FINGERPRINT
from tests.api.test_batches import content, create, finished, line, until, upload
from tests.api.test_hot_path import counted_statements, runtime_of_env

pytestmark = pytest.mark.both_databases  # the stack's parts are read in one statement: on both dialects

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def settings(tmp_path: Path, api_database_url: str | None) -> Settings:
    # 3 parts at most, 12 virtual tokens together (the fixtures' versions have 4 each); batches record progress
    # every 50 ms, and the test polls the batch (no requests_per_minute)
    return Settings(data_dir=tmp_path / "data", admin_key=ADMIN_KEY, database_url=api_database_url,
                    max_stack_prefixes=3, max_stack_virtual_tokens=12, job_heartbeat_s=0.05,
                    tenant_requests_per_minute=None)


def end_user(env: AppEnv, tenant_id: str, external_id: str) -> str:
    with env.sessions() as s:
        user = EndUser(tenant_id=tenant_id, external_id=external_id)
        s.add(user)
        s.commit()
        return user.id


@pytest.fixture
def stack_env(app_env: AppEnv, tenant: TenantKey, insert_prefix: Callable[..., str]) -> dict[str, str]:
    """`support-bot` (2 versions), `tone`, and the personal prefixes of `ann` and of `bo+b` (an id with a `+`)."""
    ids = {"support-bot": insert_prefix(tenant.tenant_id, "support-bot", versions=2),
           "tone": insert_prefix(tenant.tenant_id, "tone")}
    for ext in ("ann", "bo+b"):
        ids[f"user:{ext}"] = insert_prefix(tenant.tenant_id, f"user:{ext}",
                                           end_user_id=end_user(app_env, tenant.tenant_id, ext))
    return ids


async def complete(client: httpx.AsyncClient, tenant: TenantKey, **body: Any) -> httpx.Response:
    return await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 64, **body},
                             headers=tenant.headers)


def test_split_stack_keeps_a_personal_part_whole() -> None:
    assert split_stack("a+b@2+user:ann") == ["a", "b@2", "user:ann"]
    assert split_stack("user:ann+x") == ["user:ann+x"]  # what it meant before stacks: the user `ann+x`
    assert split_stack("a+user:bo+b@1") == ["a", "user:bo+b@1"]
    assert split_stack("a") == ["a"] and split_stack("a++b") == ["a", "", "b"]


async def test_a_stack_serves_its_versions_in_order(client: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey,
                                                   stack_env: dict[str, str]) -> None:
    cases = {
        "support-bot+user:ann": "<support-bot@2+user:ann@1>",
        "support-bot@1+user:ann": "<support-bot@1+user:ann@1>",
        "tone+support-bot@1+user:bo+b": "<tone@1+support-bot@1+user:bo+b@1>",
        "support-bot@1": "<support-bot@1>",  # a stack of one: a single prefix, as before
    }
    for model, text in cases.items():
        r = await complete(client, tenant, model=model)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == text and r.json()["model"] == model
    call = app_env.engine.calls[0]
    assert isinstance(call.prefix, tuple) and [p.prefix_id for p in call.prefix] == [
        stack_env["support-bot"], stack_env["user:ann"]]
    assert not isinstance(app_env.engine.calls[-1].prefix, tuple)  # one prefix goes to the engine as before
    chat = await client.post("/v1/chat/completions", headers=tenant.headers,
                             json={"model": "tone+user:ann", "messages": CHAT})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == "<tone@1+user:ann@1>"


async def test_the_prefixes_field(client: httpx.AsyncClient, tenant: TenantKey, stack_env: dict[str, str]) -> None:
    ok = {"model": "fake-base", "prefixes": ["user:bo+b", "support-bot@1"]}  # a `+` id anywhere in the list
    r = await complete(client, tenant, **ok)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "<user:bo+b@1+support-bot@1>"
    same = await complete(client, tenant, model="tone+support-bot", prefixes=["tone", "support-bot"])
    assert same.status_code == 200 and same.json()["choices"][0]["text"] == "<tone@1+support-bot@2>"
    for model in ("tone", "support-bot+tone", "nope"):
        bad = await complete(client, tenant, model=model, prefixes=["tone", "support-bot"])
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prefixes", bad.text
        assert "name different stacks" in bad.json()["error"]["message"]


async def test_a_missing_or_foreign_part_is_a_missing_model(
        client: httpx.AsyncClient, tenant: TenantKey, make_tenant: Callable[..., TenantKey],
        insert_prefix: Callable[..., str], stack_env: dict[str, str]) -> None:
    insert_prefix(make_tenant("other").tenant_id, "theirs")
    plain = await complete(client, tenant, model="nope")
    for model in ("support-bot+theirs", "theirs+user:ann", "support-bot+nope", "support-bot@3+user:ann",
                  "support-bot+user:bob", "support-bot@x+tone", "support-bot++tone", "fake-base+tone"):
        r = await complete(client, tenant, model=model)
        assert r.status_code == 404, (model, r.text)
        assert r.text == plain.text.replace("`nope`", f"`{model}`"), model  # the same body, byte for byte
        card = await client.get(f"/v1/models/{model}", headers=tenant.headers)
        assert card.status_code == 404 and card.json()["error"]["code"] == "model_not_found"
    r = await complete(client, tenant, model="fake-base", prefixes=["support-bot", "theirs"])
    assert r.status_code == 404 and "`support-bot+theirs`" in r.json()["error"]["message"]


@pytest.mark.sqlite_only
async def test_the_stack_limits(client: httpx.AsyncClient, tenant: TenantKey, insert_prefix: Callable[..., str],
                                stack_env: dict[str, str]) -> None:
    insert_prefix(tenant.tenant_id, "big", num_virtual_tokens=8)
    too_many = await complete(client, tenant, model="tone+tone+tone+tone")
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_prefixes"
    assert too_many.json()["error"]["param"] == "model" and "at most 3" in too_many.json()["error"]["message"]
    listed = await complete(client, tenant, model="fake-base", prefixes=["tone"] * 4)
    assert listed.status_code == 400 and listed.json()["error"]["param"] == "prefixes"
    assert (await complete(client, tenant, model="big+user:ann")).status_code == 200  # 8 + 4 <= 12
    too_long = await complete(client, tenant, model="big+tone+user:ann")  # 8 + 4 + 4 > 12
    error = too_long.json()["error"]
    assert too_long.status_code == 400 and error["param"] == "model" and error["code"] == "stack_too_long"
    assert "8 + 4 + 4 = 16 virtual tokens" in error["message"] and "at most 12" in error["message"]


async def test_a_stacked_request_costs_one_query(client: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey,
                                                stack_env: dict[str, str]) -> None:
    assert (await complete(client, tenant, model="tone")).status_code == 200  # last_used_at is written here
    runtime = runtime_of_env(app_env)
    for body in ({"model": "support-bot@1+user:ann"}, {"model": "tone+support-bot+user:ann", "max_tokens": 1},
                 {"model": "fake-base", "prefixes": ["tone", "user:bo+b"]}, {"model": "tone+nope"}):
        with counted_statements(runtime) as statements:
            r = await complete(client, tenant, **body)
        assert r.status_code in (200, 400, 404), r.text
        assert len(statements) == 1, (body, statements)


def trained_over(env: AppEnv, prefix_id: str, version: int, *, bases: list[dict[str, Any]]) -> None:
    """Make `version` of `prefix_id` the result of a training job whose options record `bases` as its base."""
    with env.sessions() as s:
        row = s.query(PrefixVersion).filter_by(prefix_id=prefix_id, version=version).one()
        prefix = s.get(Prefix, prefix_id)
        assert prefix is not None
        job = TrainingJob(tenant_id=prefix.tenant_id, status="succeeded", model="fake-base",
                          prefix_name=prefix.name, hyperparameters={}, options={"on_top_of": bases})
        s.add(job)
        s.flush()
        row.training_job_id = job.id
        s.commit()


async def test_a_part_trained_over_another_version_is_a_conflict(
        client: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey, stack_env: dict[str, str]) -> None:
    base = {"prefix_id": stack_env["support-bot"], "name": "support-bot", "version": 1}
    trained_over(app_env, stack_env["user:ann"], 1, bases=[base])
    assert (await complete(client, tenant, model="support-bot@1+user:ann")).status_code == 200
    assert (await complete(client, tenant, model="tone+support-bot@1+user:ann")).status_code == 200
    for model, front in (("support-bot+user:ann", "puts support-bot@2 in front"),
                         ("user:ann", "puts nothing in front"), ("tone+user:ann", "puts tone@1 in front")):
        r = await complete(client, tenant, model=model)
        error = r.json()["error"]
        assert r.status_code == 409 and error["code"] == "base_prefix_mismatch" and error["param"] == "model", r.text
        assert "user:ann@1 was trained on top of support-bot@1" in error["message"] and front in error["message"]
        anyway = await complete(client, tenant, model=model, allow_base_mismatch=True)
        assert anyway.status_code == 200, anyway.text
    listed = await complete(client, tenant, model="fake-base", prefixes=["support-bot@2", "user:ann"])
    assert listed.status_code == 409 and listed.json()["error"]["param"] == "prefixes"
    card = (await client.get("/v1/models/support-bot+user:ann", headers=tenant.headers)).json()
    assert card["prefixes"][1]["on_top_of"] == "support-bot@1"


async def test_a_part_made_for_another_base_model(client: httpx.AsyncClient, tenant: TenantKey,
                                                  insert_prefix: Callable[..., str],
                                                  stack_env: dict[str, str]) -> None:
    insert_prefix(tenant.tenant_id, "old", fingerprint="fp-old")
    r = await complete(client, tenant, model="tone+old")
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_mismatch" and "old@1" in r.text


async def test_retrieve_a_stack(client: httpx.AsyncClient, tenant: TenantKey, stack_env: dict[str, str]) -> None:
    r = await client.get("/v1/models/support-bot@1+user:ann", headers=tenant.headers)
    assert r.status_code == 200, r.text
    card = r.json()
    assert card["id"] == "support-bot@1+user:ann" and card["parent"] == "fake-base"
    assert card["num_virtual_tokens"] == 8 and card["owned_by"] == tenant.tenant_id
    assert [(p["name"], p["version"], p["num_virtual_tokens"], p["on_top_of"]) for p in card["prefixes"]] == [
        ("support-bot", 1, 4, None), ("user:ann", 1, 4, None)]
    single = (await client.get("/v1/models/support-bot", headers=tenant.headers)).json()
    assert "prefixes" not in single  # a single prefix's card is unchanged


async def test_resolving_without_the_access_query(app_env: AppEnv, tenant: TenantKey,
                                                  stack_env: dict[str, str]) -> None:
    """The path of a request whose access did not read `model` (the Batch API's): one lookup of every part."""
    with app_env.sessions() as s:
        target = resolve_model(s, tenant_id=tenant.tenant_id, model="support-bot@1+user:bo+b",
                               base_model_id="fake-base", fingerprint=FAKE_FINGERPRINT, limits=StackLimits())
    assert [(r.name, r.version) for r in target.stack] == [("support-bot", 1), ("user:bo+b", 1)]
    assert target.num_virtual_tokens == 8 and target.ref is None and target.prefix == target.stack


async def test_a_stack_in_a_batch(client: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey,
                                  stack_env: dict[str, str]) -> None:
    """The Batch API's requests are resolved without the access query (one lookup of every part) and within the
    server's stack limits."""
    app_env.app.state.batch_runner.fingerprint = lambda: FAKE_FINGERPRINT
    bodies = {"stack": {"model": "support-bot@1+user:ann", "prompt": "x", "max_tokens": 64},
              "listed": {"model": "fake-base", "prefixes": ["user:bo+b", "tone"], "prompt": "x", "max_tokens": 64},
              "missing": {"model": "tone+nope", "prompt": "x"}, "too-many": {"model": "tone+tone+tone+tone",
                                                                             "prompt": "x"}}
    batch = await create(client, tenant, await upload(client, tenant, [line(k, v) for k, v in bodies.items()]))
    batch = await until(client, tenant, batch["id"], finished, "the batch finishing")
    out = {o["custom_id"]: o["response"]["body"] for o in await content(client, tenant, batch["output_file_id"])}
    assert out["stack"]["choices"][0]["text"] == "<support-bot@1+user:ann@1>"
    assert out["listed"]["choices"][0]["text"] == "<user:bo+b@1+tone@1>"
    errors = {e["custom_id"]: e["response"]["body"] for e in await content(client, tenant, batch["error_file_id"])}
    assert errors["missing"]["error"]["code"] == "model_not_found"
    assert errors["too-many"]["error"]["code"] == "too_many_prefixes"  # the server's limit of 3, not the default 4
