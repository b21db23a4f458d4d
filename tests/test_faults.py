"""Faults with real processes: a `prefixserve serve` subprocess on random:tiny-llama while its
Redis is killed, its PostgreSQL is stopped, its object store becomes unreachable; and an exception inside an
engine step, at the HTTP level.

- Redis: the test's own redis-server (never the machine's shared one), SIGKILLed during traffic and restarted
  empty on the same port.
- PostgreSQL: the test's own cluster (initdb in a temp dir, pg_ctl), stopped with `-m fast` (open connections
  terminated, as in a restart) and started again.
- Object store: the shared SeaweedFS, reached through a TCP proxy the test closes and reopens.

A worker killed mid-job is tested in tests/training/test_worker.py
(test_a_killed_worker_leaves_nothing_published_and_a_second_worker_finishes); an exception in a prefill failing
only its rows in tests/engine/test_loop.py (test_exception_in_prefill_fails_only_the_new_rows) and here through
HTTP.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.migrate import upgrade
from app.db.models import Prefix
from app.engine.model import load_model
from app.main import create_app
from prefix_store.cache_tier import KEY_PREFIX
from prefix_store.codec import encode_native
from tests.engine.helpers import random_prefix
from tests.fault_services import PgCluster, RedisServer, TcpProxy
from tests.s3_server import S3Server
from tests.server_proc import MODEL, ServerProcess

pytestmark = pytest.mark.slow

ADMIN_KEY = "faults-test-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TIMEOUT_S = 30.0
# A 6-token prefix of tiny-llama is 2 layers x 2 KV heads x 6 x 16 x 4 bytes x 2 (keys, values) = 3072 bytes.
POOL_ONE_PREFIX = 4096
LONG_TOKENS = 1500  # greedy on the random model: no EOS before this


@pytest.fixture(scope="module")
def prefix_bytes(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    loaded = load_model(MODEL, data_dir=tmp_path_factory.mktemp("model"))  # the server's deterministic weights
    return [encode_native(random_prefix(loaded, 6, seed=seed, scale=2.0)) for seed in range(4)]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.kill()


@pytest.fixture
def pg() -> Iterator[PgCluster]:
    cluster = PgCluster()
    upgrade(cluster.url)
    yield cluster
    cluster.remove()


class Client:
    """One server and one tenant's key."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=TIMEOUT_S)
        r = self.http.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN)
        assert r.status_code == 201, r.text
        self.auth = {"Authorization": f"Bearer {r.json()['api_key']}"}

    def upload(self, name: str, data: bytes) -> httpx.Response:
        return self.http.post("/v1/prefixes", headers=self.auth, data={"name": name},
                              files={"file": ("prefix.safetensors", data, "application/octet-stream")})

    def complete(self, model: str) -> httpx.Response:
        return self.http.post("/v1/completions", headers=self.auth,
                              json={"model": model, "prompt": "The quick brown fox", "max_tokens": 6,
                                    "temperature": 0})

    def text(self, model: str) -> str:
        r = self.complete(model)
        assert r.status_code == 200, r.text
        text: str = r.json()["choices"][0]["text"]
        return text


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """serve(settings) starts a server with a tenant; every server is stopped (its log tail shown on failure)."""
    started: list[ServerProcess] = []

    def start(settings: dict[str, str]) -> Client:
        server = ServerProcess(tmp_path / f"server-{len(started)}.log", {
            "PREFIXSERVE_DATA_DIR": str(tmp_path / "data"), "PREFIXSERVE_ADMIN_KEY": ADMIN_KEY, **settings})
        started.append(server)
        server.wait_ready()
        return Client(server)

    yield start
    for server in started:
        server.stop()
        print(f"--- {server.log_path.name} (tail)\n{server.log_tail()}")


def _assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) > 0
    assert r.json()["error"]["type"] == "service_unavailable"


def test_redis_killed_during_traffic(serve: Any, redis_server: RedisServer, postgres_url: str,
                                     prefix_bytes: list[bytes]) -> None:
    upgrade(postgres_url)
    c = serve({"PREFIXSERVE_DATABASE_URL": postgres_url, "PREFIXSERVE_REDIS_URL": redis_server.url,
               "PREFIXSERVE_JOB_QUEUE": "none"})
    assert c.upload("pooled", prefix_bytes[0]).status_code == 201
    assert c.upload("stored", prefix_bytes[1]).status_code == 201
    pooled = c.text("pooled")  # now in the device pool
    cache = redis_server.client()
    assert cache.keys(f"{KEY_PREFIX}:*")  # the upload wrote the cache tier

    # Traffic while Redis dies: every request succeeds, served from the device pool or the object store.
    results: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            results.append(c.complete("pooled").status_code)

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    _wait_for_more(results, 5)  # traffic is flowing
    redis_server.kill()
    _wait_for_more(results, 10)  # and keeps flowing with Redis dead (each is checked below)
    assert c.text("pooled") == pooled
    assert c.complete("stored").status_code == 200  # first use: from the object store, no cache tier
    assert c.upload("during", prefix_bytes[2]).status_code == 201  # uploads need no Redis either
    assert c.complete("during").status_code == 200
    stop.set()
    for t in threads:
        t.join(TIMEOUT_S)
    assert results and set(results) == {200}, results

    # Redis returns (empty): the cache tier is written again without a restart of the server.
    redis_server.start()
    # A prefix's first load writes it to the cache tier again once the tier's retry interval (1 s) has passed
    # since Redis last failed: a new prefix each time, until one is written.
    deadline = time.monotonic() + 10
    for i in itertools.count():
        assert c.upload(f"after-{i}", prefix_bytes[3]).status_code == 201
        assert c.complete(f"after-{i}").status_code == 200
        if cache.keys(f"{KEY_PREFIX}:*"):
            break
        assert time.monotonic() < deadline, "the cache tier was not used again after Redis came back"
        time.sleep(0.2)
    assert c.text("pooled") == pooled


def test_postgres_down_gives_503_and_recovers(serve: Any, pg: PgCluster, prefix_bytes: list[bytes]) -> None:
    c = serve({"PREFIXSERVE_DATABASE_URL": pg.url, "PREFIXSERVE_JOB_QUEUE": "inprocess",
               "PREFIXSERVE_JOB_SWEEP_INTERVAL_S": "1"})
    assert c.upload("kept", prefix_bytes[0]).status_code == 201
    kept = c.text("kept")
    # Long enough to outlast the outage below (about 3 s) several times over; checked after the outage.
    job_id = _create_job(c, max_steps=1500)
    _wait_training(c, job_id)  # past its set-up (inputs read from the database): training steps are being made

    outage_began = int(time.time())  # whole seconds, like the job's finished_at
    pg.stop()  # the training job keeps running through the outage (heartbeats and events fail meanwhile)
    try:
        time.sleep(2.5)  # longer than a heartbeat interval (2 s)
        for r in (c.complete("kept"), c.http.get("/v1/models", headers=c.auth), c.upload("lost", prefix_bytes[1]),
                  c.http.get(f"/v1/fine_tuning/jobs/{job_id}", headers=c.auth),
                  # The admin key is checked without the database: the route's own query meets the outage.
                  c.http.get("/admin/tenants", headers=ADMIN), c.http.post("/admin/tenants", headers=ADMIN,
                                                                           json={"name": "lost"})):
            _assert_unavailable(r)
        ready = c.http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"] is False
        assert c.http.get("/healthz").status_code == 200  # the process is alive: no restart wanted
    finally:
        pg.start()

    # Full recovery, without a restart: the very next requests succeed; nothing was lost.
    assert c.text("kept") == kept
    assert c.http.get("/readyz").status_code == 200
    assert c.upload("new", prefix_bytes[2]).status_code == 201
    ids = {m["id"] for m in c.http.get("/v1/models", headers=c.auth).json()["data"]}
    assert {"kept", "new"} <= ids and "lost" not in ids
    job = _wait_job(c, job_id, {"succeeded", "failed", "cancelled"})
    assert (job["status"], job["trained_tokens"] is not None) == ("succeeded", True), job
    # The job ran through the outage in its first attempt: it finished after the outage began, never handed back.
    assert job["finished_at"] >= outage_began, job
    events = c.http.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=c.auth, params={"limit": 100}).json()
    assert not [e for e in events["data"] if "re-queued" in e["message"]], events
    assert c.complete(job["fine_tuned_model"]).status_code == 200


def test_object_store_down(serve: Any, s3_server: S3Server, redis_server: RedisServer, postgres_url: str,
                           prefix_bytes: list[bytes]) -> None:
    upgrade(postgres_url)
    proxy = TcpProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    try:
        c = serve({"PREFIXSERVE_DATABASE_URL": postgres_url, "PREFIXSERVE_REDIS_URL": redis_server.url,
                   "PREFIXSERVE_JOB_QUEUE": "none", "PREFIXSERVE_DEVICE_POOL_BYTES": str(POOL_ONE_PREFIX),
                   "PREFIXSERVE_OBJECT_STORE_URL": f"s3://faults-{int(time.time() * 1000)}/blobs",
                   "PREFIXSERVE_S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}",
                   "PREFIXSERVE_S3_ACCESS_KEY_ID": s3_server.access_key,
                   "PREFIXSERVE_S3_SECRET_ACCESS_KEY": s3_server.secret_key})
        for name, data in zip(("cached", "pooled", "uncached"), prefix_bytes, strict=False):
            assert c.upload(name, data).status_code == 201
        c.text("cached")  # read from the object store: written back to Redis, then evicted from the device pool by
        pooled = c.text("pooled")  # this one (the pool holds one prefix); "uncached" was never read
        keys = [k.decode() for k in redis_server.client().keys(f"{KEY_PREFIX}:*")]
        assert len(keys) == 2 and not any(_prefix_id(c, "uncached") in k for k in keys), keys

        proxy.down()
        assert c.text("pooled") == pooled
        assert c.complete("cached").status_code == 200
        r = c.complete("uncached")
        assert r.status_code == 503 and r.json()["error"]["code"] == "prefix_unavailable", r.text
        r = c.upload("lost", prefix_bytes[3])
        _assert_unavailable(r)
        assert _prefix_rows(postgres_url, "lost") == 0  # nothing half-stored
        assert c.http.get("/v1/models/lost", headers=c.auth).status_code == 404

        proxy.up()
        assert c.complete("uncached").status_code == 200
        assert c.upload("lost", prefix_bytes[3]).status_code == 201
        assert c.complete("lost").status_code == 200
    finally:
        proxy.down()


def _wait_for_more(results: list[int], n: int) -> None:
    """Until `n` more requests than now have been answered."""
    target, deadline = len(results) + n, time.monotonic() + TIMEOUT_S
    while len(results) < target:
        assert time.monotonic() < deadline, f"only {len(results)} of {target} answered"
        time.sleep(0.01)


def _prefix_id(c: Client, name: str) -> str:
    """The prefix id of `name` (its cache-tier keys contain it)."""
    r = c.http.get(f"/v1/prefixes/{name}", headers=c.auth)
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def _prefix_rows(url: str, name: str) -> int:
    db = sa.create_engine(url)
    try:
        with Session(db) as s:
            return s.scalar(sa.select(sa.func.count()).select_from(Prefix).where(Prefix.name == name)) or 0
    finally:
        db.dispose()


def _create_job(c: Client, *, max_steps: int) -> str:
    lines = b"".join(json.dumps({"prompt": f"name: N{i} =>", "completion": f" N{i}."}).encode() + b"\n"
                     for i in range(16))
    r = c.http.post("/v1/files", headers=c.auth, data={"purpose": "fine-tune"},
                    files={"file": ("train.jsonl", lines, "application/jsonl")})
    assert r.status_code == 200, r.text
    base = c.http.get("/v1/models", headers=c.auth).json()["data"][0]["id"]
    r = c.http.post("/v1/fine_tuning/jobs", headers=c.auth, json={
        "model": base, "training_file": r.json()["id"], "suffix": "durable", "num_virtual_tokens": 4, "seed": 1,
        "hyperparameters": {"max_steps": max_steps, "batch_size": 4, "checkpoint_every": 100}})
    assert r.status_code == 200, r.text
    job_id: str = r.json()["id"]
    return job_id


def _wait_training(c: Client, job_id: str) -> None:
    """Until the job has reported a training step (a `metrics` event)."""
    deadline = time.monotonic() + 180
    while True:
        r = c.http.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=c.auth, params={"limit": 100})
        assert r.status_code == 200, r.text
        if any(e["type"] == "metrics" for e in r.json()["data"]):
            return
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)


def _wait_job(c: Client, job_id: str, statuses: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    while True:
        r = c.http.get(f"/v1/fine_tuning/jobs/{job_id}", headers=c.auth)
        assert r.status_code == 200, r.text
        job: dict[str, Any] = r.json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.3)


def test_an_exception_in_an_engine_step_fails_only_the_affected_requests(tmp_path: Path) -> None:
    """In process on a real uvicorn (the fault is injected at the engine boundary): prefills raise while
    `poisoned` is set; the stream already decoding is not affected, the poisoned requests get a 503, and the
    server goes on."""
    # One torch thread: more oversubscribe the 2 cores and make decode steps 10x slower (measured).
    settings = Settings(data_dir=tmp_path / "data", model=MODEL, admin_key=ADMIN_KEY, torch_threads=1)
    app = create_app(settings)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not srv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        port = srv.servers[0].sockets[0].getsockname()[1]
        _engine_fault(f"http://127.0.0.1:{port}", app.state.runtime.engine)
    finally:
        srv.should_exit = True
        thread.join(30)


def _engine_fault(url: str, engine: Any) -> None:
    http = httpx.Client(base_url=url, timeout=TIMEOUT_S)
    r = http.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN)
    auth = {"Authorization": f"Bearer {r.json()['api_key']}"}
    real_forward = engine.runner.forward
    poisoned = threading.Event()

    def forward(batch: Any) -> Any:
        if poisoned.is_set() and batch.input_ids.shape[1] > 1:  # a prefill (decode steps feed one token)
            raise RuntimeError("injected fault")
        return real_forward(batch)

    engine.runner.forward = forward
    base = http.get("/v1/models", headers=auth).json()["data"][0]["id"]
    body = {"model": base, "prompt": "hi", "temperature": 0}
    long: dict[str, Any] = {}

    def read_long() -> None:
        with http.stream("POST", "/v1/completions", headers=auth, json={
                **body, "max_tokens": LONG_TOKENS, "n": 4, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            long["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    reader = threading.Thread(target=read_long)
    reader.start()
    deadline = time.monotonic() + TIMEOUT_S
    while engine.stats.running_rows < 4:  # the long request is decoding
        assert time.monotonic() < deadline and reader.is_alive()
        time.sleep(0.01)
    poisoned.set()
    for stream in (False, True):  # a stream fails before its first chunk: the same 503, no SSE
        r = http.post("/v1/completions", headers=auth, json={**body, "max_tokens": 4, "stream": stream})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_error", r.text
        assert "internal error" in r.json()["error"]["message"] and r.headers["Retry-After"] == "5"
    assert engine.stats.running_rows == 4  # still decoding: the failed prefills took nothing with them
    poisoned.clear()
    reader.join(TIMEOUT_S * 2)
    usage = json.loads(long["lines"][-2].removeprefix("data: "))["usage"]
    assert usage["completion_tokens"] == 4 * LONG_TOKENS and long["lines"][-1] == "data: [DONE]"
    assert http.post("/v1/completions", headers=auth, json={**body, "max_tokens": 4}).status_code == 200
    http.close()
