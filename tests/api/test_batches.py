"""The Batch API over HTTP, with the runner in the app's lifespan and the fake engine: each request's answer is the
endpoint's own (bodies and errors), a malformed file fails the batch naming its lines, cancel and expiry keep what
finished, another tenant's batch and files answer like missing ones, a dead runner's batch is resumed without
running a recorded request again, and the requests reach the engine at batch priority."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from app.batches.run import Pace
from app.config import Settings
from app.db.models import Batch, BatchResult, File, utcnow
from app.engine.protocol import EngineOverloaded
from tests.api.conftest import ADMIN_KEY, AppEnv, TenantKey
from tests.api.fake_engine import FAKE_FINGERPRINT, Call, FakeEngineClient

pytestmark = pytest.mark.both_databases  # the requests reach the database: run on both

COMPLETIONS = "/v1/completions"


class HangingEngine(FakeEngineClient):
    """The fake engine, except that a request whose prompt holds "hang" waits until it is cancelled, the first
    `overloaded` requests find the engine's queue full, and tokenizing the prompt "boom" fails (a bug)."""

    overloaded = 0

    def encode_prompt(self, prompt: Any) -> list[int]:
        if prompt == "boom":
            raise AssertionError("a bug while tokenizing")  # not an error any layer maps to an answer
        return super().encode_prompt(prompt)

    async def generate(self, **kw: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        if self.overloaded > 0:
            self.overloaded -= 1
            self.calls.append(Call(kw["prompt_ids"], kw["sampling"], None, "", priority=kw["priority"]))
            raise EngineOverloaded("1024 requests are already waiting")
        if "hang" in "".join(chr(t) for t in kw["prompt_ids"]):
            call = Call(kw["prompt_ids"], kw["sampling"], kw.get("prefix"), kw.get("request_id") or "",
                        priority=kw.get("priority", "interactive"))
            self.calls.append(call)
            try:
                await asyncio.Event().wait()
            finally:
                call.cancelled = True
        async for ev in super().generate(**kw):
            yield ev


@pytest.fixture
def settings(tmp_path: Path, api_database_url: str | None) -> Settings:
    # Progress is recorded every 50 ms (the heartbeat), so tests see finished requests without waiting long; the
    # tests poll the batches, so no requests_per_minute.
    return Settings(data_dir=tmp_path / "data", admin_key=ADMIN_KEY, database_url=api_database_url,
                    job_heartbeat_s=0.05, tenant_requests_per_minute=None)


@pytest.fixture
def fake_engine() -> FakeEngineClient:
    return HangingEngine()


@pytest.fixture
async def api(client: httpx.AsyncClient, app_env: AppEnv) -> httpx.AsyncClient:
    """The client, with the runner serving the fake engine's base model (the app has no model loaded)."""
    app_env.app.state.batch_runner.fingerprint = lambda: FAKE_FINGERPRINT
    return client


def line(custom_id: str, body: dict[str, Any], url: str = COMPLETIONS) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


async def upload(client: httpx.AsyncClient, tenant: TenantKey, lines: list[str]) -> str:
    data = ("\n".join(lines) + "\n").encode()
    r = await client.post("/v1/files", headers=tenant.headers, data={"purpose": "batch"},
                          files={"file": ("in.jsonl", data)})
    assert r.status_code == 200, r.text
    assert r.json()["purpose"] == "batch"
    return str(r.json()["id"])


async def create(client: httpx.AsyncClient, tenant: TenantKey, file_id: str, **extra: Any) -> dict[str, Any]:
    body = {"input_file_id": file_id, "endpoint": COMPLETIONS, "completion_window": "24h", **extra}
    r = await client.post("/v1/batches", headers=tenant.headers, json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def until(client: httpx.AsyncClient, tenant: TenantKey, batch_id: str,
                done: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """Poll the batch until `done` holds (the deadline only turns a hang into a failure)."""
    deadline = time.monotonic() + 60
    while True:
        r = await client.get(f"/v1/batches/{batch_id}", headers=tenant.headers)
        assert r.status_code == 200, r.text
        if done(r.json()):
            return r.json()  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"never happened: {what} ({r.json()['status']})"
        await asyncio.sleep(0.01)


def finished(b: dict[str, Any]) -> bool:
    return b["status"] in ("completed", "failed", "expired", "cancelled")


async def content(client: httpx.AsyncClient, tenant: TenantKey, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    r = await client.get(f"/v1/files/{file_id}/content", headers=tenant.headers)
    assert r.status_code == 200, r.text
    return [json.loads(x) for x in r.text.splitlines()]


async def test_each_request_is_answered_as_its_endpoint_answers_it(
        api: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey, insert_prefix: Callable[..., str]) -> None:
    insert_prefix(tenant.tenant_id, "bot")
    bodies = {"base": {"model": "fake-base", "prompt": "hi", "max_tokens": 5},
              "bot": {"model": "bot", "prompt": "hi", "seed": 3},
              "bad": {"model": "fake-base", "prompt": "hi", "max_tokens": 0},
              "missing": {"model": "nope", "prompt": "hi"},
              "unknown-field": {"model": "fake-base", "prompt": "hi", "bogus": 1}}
    file_id = await upload(api, tenant, [line(k, v) for k, v in bodies.items()])
    created = await create(api, tenant, file_id, metadata={"job": "nightly"})
    assert created["status"] == "in_progress" and created["request_counts"]["total"] == 5
    assert created["metadata"] == {"job": "nightly"} and created["expires_at"] - created["created_at"] == 86400
    batch = await until(api, tenant, created["id"], finished, "the batch finishing")
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 5, "completed": 2, "failed": 3}
    assert batch["completed_at"] is not None and batch["finalizing_at"] is not None
    assert app_env.engine.calls and all(c.priority == "batch" for c in app_env.engine.calls)

    out = await content(api, tenant, batch["output_file_id"])
    errors = await content(api, tenant, batch["error_file_id"])
    assert [o["custom_id"] for o in out] == ["base", "bot"]
    assert [e["custom_id"] for e in errors] == ["bad", "missing", "unknown-field"]
    usage = {"input_tokens": 0, "output_tokens": 0}
    for record in out + errors:
        assert record["id"].startswith("batch_req_") and record["error"] is None
        direct = await api.post(COMPLETIONS, headers=tenant.headers, json=bodies[record["custom_id"]])
        response = record["response"]
        assert response["status_code"] == direct.status_code and response["request_id"].startswith("req_")
        if direct.status_code != 200:
            assert response["body"] == direct.json()  # the same error, word for word
            continue
        same = {k: v for k, v in direct.json().items() if k not in ("id", "created")}
        assert {k: v for k, v in response["body"].items() if k not in ("id", "created")} == same
        usage["input_tokens"] += same["usage"]["prompt_tokens"]
        usage["output_tokens"] += same["usage"]["completion_tokens"]
    assert {k: batch["usage"][k] for k in usage} == usage

    files = (await api.get("/v1/files", headers=tenant.headers, params={"purpose": "batch_output"})).json()["data"]
    assert {f["id"] for f in files} == {batch["output_file_id"], batch["error_file_id"]}
    with app_env.sessions() as s:  # the recorded results are gone once the files hold them
        assert s.scalar(sa.select(sa.func.count()).select_from(BatchResult)) == 0
    r = await api.delete(f"/v1/files/{file_id}", headers=tenant.headers)  # finished: its input may go
    assert r.status_code == 200, r.text


async def test_a_malformed_file_fails_the_batch_naming_its_lines_and_nothing_runs(
        api: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey) -> None:
    ok = {"model": "fake-base", "prompt": "hi"}
    lines = [line("a", ok), "{not json", line("b", ok, url="/v1/chat/completions"),
             json.dumps({"method": "POST", "url": COMPLETIONS, "body": ok}), line("a", ok), "", line("c", ok)]
    batch = await create(api, tenant, await upload(api, tenant, lines))
    assert batch["status"] == "failed" and batch["failed_at"] is not None
    got = [(e["line"], e["code"], e["param"]) for e in batch["errors"]["data"]]
    assert got == [(2, "invalid_json_line", None), (3, "invalid_url", "url"), (4, "missing_custom_id", "custom_id"),
                   (5, "duplicate_custom_id", "custom_id")]
    assert "line 1" in batch["errors"]["data"][3]["message"]  # where the custom_id was first used
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0} and batch["output_file_id"] is None
    assert app_env.engine.calls == []


@pytest.mark.sqlite_only
async def test_bad_create_requests_are_400s_naming_the_field(
        api: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey) -> None:
    file_id = await upload(api, tenant, [line("a", {"model": "fake-base", "prompt": "hi"})])
    good = {"input_file_id": file_id, "endpoint": COMPLETIONS, "completion_window": "24h"}
    for change, param in [({"completion_window": "1h"}, "completion_window"),
                          ({"endpoint": "/v1/embeddings"}, "endpoint"),
                          ({"output_expires_after": {"anchor": "created_at", "seconds": 3600}}, "output_expires_after"),
                          ({"metadata": {"k" * 65: "v"}}, "metadata")]:
        r = await api.post("/v1/batches", headers=tenant.headers, json={**good, **change})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (change, r.text)
    training = await api.post("/v1/files", headers=tenant.headers, data={"purpose": "fine-tune"},
                              files={"file": ("t.jsonl", b'{"prompt": "a", "completion": "b"}\n')})
    r = await api.post("/v1/batches", headers=tenant.headers, json={**good, "input_file_id": training.json()["id"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_file_purpose"
    r = await api.post("/v1/files", headers=tenant.headers, data={"purpose": "batch"},
                       files={"file": ("in.jsonl", b"\xff\xfe")})
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    # max_concurrent_batches: the tenant's unfinished batches are bounded.
    await api.put(f"/admin/tenants/{tenant.tenant_id}/limits", json={"max_concurrent_batches": 0},
                  headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    r = await api.post("/v1/batches", headers=tenant.headers, json=good)
    assert r.status_code == 429 and "max_concurrent_batches limit of 0" in r.json()["error"]["message"]


async def test_another_tenants_batch_and_files_answer_like_missing_ones(
        api: httpx.AsyncClient, tenant: TenantKey, make_tenant: Callable[..., TenantKey]) -> None:
    other = make_tenant("other")
    batch = await create(api, tenant, await upload(api, tenant, [line("a", {"model": "fake-base", "prompt": "x"})]))
    batch = await until(api, tenant, batch["id"], finished, "the batch finishing")
    missing = "batch_" + "x" * 24
    for path in ("/v1/batches/{}", "/v1/batches/{}/cancel"):
        method = api.post if path.endswith("cancel") else api.get
        theirs, absent = await method(path.format(batch["id"]), headers=other.headers), \
            await method(path.format(missing), headers=other.headers)
        assert theirs.status_code == absent.status_code == 404
        assert theirs.text.replace(batch["id"], missing) == absent.text
    output, absent_file = batch["output_file_id"], "file-" + "x" * 24
    theirs = await api.get(f"/v1/files/{output}/content", headers=other.headers)
    absent = await api.get(f"/v1/files/{absent_file}/content", headers=other.headers)
    assert theirs.status_code == 404 and theirs.text.replace(output, absent_file) == absent.text
    assert (await api.get("/v1/batches", headers=other.headers)).json()["data"] == []
    page = (await api.get("/v1/batches", headers=tenant.headers, params={"limit": 1})).json()
    assert [b["id"] for b in page["data"]] == [batch["id"]] and page["has_more"] is False


async def test_cancel_stops_the_requests_in_flight_and_keeps_the_finished_ones(
        api: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey) -> None:
    file_id = await upload(api, tenant, [line("done", {"model": "fake-base", "prompt": "a"}),
                                         line("stuck", {"model": "fake-base", "prompt": "hang"})])
    batch = await create(api, tenant, file_id)
    await until(api, tenant, batch["id"], lambda b: b["request_counts"]["completed"] == 1, "the first answer")
    r = await api.delete(f"/v1/files/{file_id}", headers=tenant.headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "file_in_use"  # the batch still reads it
    r = await api.post(f"/v1/batches/{batch['id']}/cancel", headers=tenant.headers)
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    batch = await until(api, tenant, batch["id"], finished, "the batch cancelled")
    assert batch["status"] == "cancelled" and batch["cancelling_at"] and batch["cancelled_at"]
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 0} and batch["error_file_id"] is None
    assert [o["custom_id"] for o in await content(api, tenant, batch["output_file_id"])] == ["done"]
    assert [c.cancelled for c in app_env.engine.calls if c.prompt_ids == [ord(c) for c in "hang"]] == [True]
    r = await api.post(f"/v1/batches/{batch['id']}/cancel", headers=tenant.headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "batch_not_cancellable"


async def test_an_expired_batch_keeps_its_answers_and_reports_the_rest(
        api: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey) -> None:
    file_id = await upload(api, tenant, [line("done", {"model": "fake-base", "prompt": "a"}),
                                         line("late", {"model": "fake-base", "prompt": "hang"})])
    batch = await create(api, tenant, file_id)
    await until(api, tenant, batch["id"], lambda b: b["request_counts"]["completed"] == 1, "the first answer")
    with app_env.sessions() as s:  # its 24 hours are over
        s.execute(sa.update(Batch).where(Batch.id == batch["id"]).values(expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    batch = await until(api, tenant, batch["id"], finished, "the batch expiring")
    assert batch["status"] == "expired" and batch["expired_at"] is not None
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert [o["custom_id"] for o in await content(api, tenant, batch["output_file_id"])] == ["done"]
    late = await content(api, tenant, batch["error_file_id"])
    assert [(e["custom_id"], e["response"], e["error"]["code"]) for e in late] == [("late", None, "batch_expired")]


async def test_a_dead_runners_batch_is_resumed_without_running_recorded_requests_again(
        api: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey) -> None:
    lines = [line(f"r{i}", {"model": "fake-base", "prompt": f"p{i}"}) for i in range(3)]
    file_id = await upload(api, tenant, lines)
    recorded = json.dumps({"id": "batch_req_before", "custom_id": "r1", "response": {"status_code": 200}})
    with app_env.sessions() as s:  # a batch another replica held, recorded r1, then died (heartbeat stale)
        sha = s.get_one(File, file_id).sha256
        long_ago = utcnow() - timedelta(hours=1)
        row = Batch(tenant_id=tenant.tenant_id, endpoint=COMPLETIONS, input_file_id=file_id, input_sha256=sha,
                    completion_window="24h", status="in_progress", total=3, completed=1, expires_at=utcnow() +
                    timedelta(hours=1), lease_token="dead-replica", heartbeat_at=long_ago, attempts=1)
        s.add(row)
        s.flush()
        s.add(BatchResult(batch_id=row.id, line=2, ok=True, record=recorded))
        s.commit()
        batch_id = row.id
    app_env.app.state.wake_batches()
    batch = await until(api, tenant, batch_id, finished, "the resumed batch finishing")
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3
    out = await content(api, tenant, batch["output_file_id"])
    assert [o["custom_id"] for o in out] == ["r0", "r1", "r2"] and out[1]["id"] == "batch_req_before"
    assert sorted(bytes(c.prompt_ids).decode() for c in app_env.engine.calls) == ["p0", "p2"]  # r1 not again
    with app_env.sessions() as s:
        assert s.get_one(Batch, batch_id).attempts == 2


async def test_generated_tokens_count_against_the_tenants_tokens_per_minute(
        api: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey) -> None:
    app_env.app.state.batch_runner.slots = asyncio.Semaphore(1)  # one request at a time
    await api.put(f"/admin/tenants/{tenant.tenant_id}/limits", json={"tokens_per_minute": 5},
                  headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    lines = [line(c, {"model": "fake-base", "prompt": "x"}) for c in ("first", "second")]
    batch = await create(api, tenant, await upload(api, tenant, lines))
    batch = await until(api, tenant, batch["id"], lambda b: b["request_counts"]["completed"] == 1, "one answer")
    assert batch["usage"]["output_tokens"] > 5
    # The first answer spent the minute's tokens: the tenant's interactive requests are refused, and the batch's
    # next request waits for the next minute without reaching the engine...
    r = await api.post(COMPLETIONS, headers=tenant.headers, json={"model": "fake-base", "prompt": "x"})
    assert r.status_code == 429 and "tokens_per_minute limit of 5" in r.json()["error"]["message"]
    assert len(app_env.engine.calls) == 1
    # ...and a cancel ends the wait at once.
    await api.post(f"/v1/batches/{batch['id']}/cancel", headers=tenant.headers)
    batch = await until(api, tenant, batch["id"], finished, "the batch cancelled")
    assert batch["status"] == "cancelled" and batch["request_counts"]["completed"] == 1
    assert len(app_env.engine.calls) == 1


async def test_a_request_the_engine_cannot_take_now_is_tried_again(
        api: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey) -> None:
    engine = app_env.engine
    app_env.app.state.batch_runner.pace = Pace(retry_base_s=0.0, heartbeat_s=0.05, max_attempts=3)
    engine.overloaded = 2  # type: ignore[attr-defined]  # two tries find the queue full, the third is answered
    batch = await create(api, tenant, await upload(api, tenant, [line("a", {"model": "fake-base", "prompt": "x"})]))
    batch = await until(api, tenant, batch["id"], finished, "the batch finishing")
    assert batch["request_counts"] == {"total": 1, "completed": 1, "failed": 0} and len(engine.calls) == 3
    engine.overloaded = 3  # type: ignore[attr-defined]  # every try: the last failure is the request's answer
    batch = await create(api, tenant, await upload(api, tenant, [line("b", {"model": "fake-base", "prompt": "x"})]))
    batch = await until(api, tenant, batch["id"], finished, "the batch finishing")
    (error,) = await content(api, tenant, batch["error_file_id"])
    assert error["response"]["status_code"] == 429 and error["response"]["body"]["error"]["code"] == "overloaded"


async def test_a_stopping_server_records_what_finished_and_hands_its_batch_back(
        api: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey) -> None:
    file_id = await upload(api, tenant, [line("done", {"model": "fake-base", "prompt": "a"}),
                                         line("stuck", {"model": "fake-base", "prompt": "hang"})])
    batch = await create(api, tenant, file_id)
    await until(api, tenant, batch["id"], lambda b: b["request_counts"]["completed"] == 1, "the first answer")
    await app_env.app.state.batch_runner.stop()
    with app_env.sessions() as s:
        row = s.get_one(Batch, batch["id"])
        assert (row.status, row.lease_token, row.completed) == ("in_progress", None, 1)  # claimable at once
        assert s.scalars(sa.select(BatchResult.line).where(BatchResult.batch_id == row.id)).all() == [1]
    assert [c.cancelled for c in app_env.engine.calls if c.prompt_ids == [ord(c) for c in "hang"]] == [True]


async def test_a_request_that_fails_unexpectedly_is_a_500_in_the_error_file(
        api: httpx.AsyncClient, tenant: TenantKey) -> None:
    lines = [line("bug", {"model": "fake-base", "prompt": "boom"}), line("fine", {"model": "fake-base", "prompt": "x"})]
    batch = await create(api, tenant, await upload(api, tenant, lines))
    batch = await until(api, tenant, batch["id"], finished, "the batch finishing")
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    (error,) = await content(api, tenant, batch["error_file_id"])
    assert error["response"]["status_code"] == 500
    assert error["response"]["body"]["error"] == {"message": "internal server error", "type": "server_error",
                                                  "param": None, "code": None}
