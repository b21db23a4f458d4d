"""Readiness with real processes: `prefixserve serve` subprocesses on random:tiny-llama against a fresh PostgreSQL
database (never migrated), a stopped Redis and an unreachable object store, and two replicas that migrate on
start at the same moment.

- an empty database: /readyz 503 naming the revision and `prefixserve migrate`, every API route 503 with
  Retry-After and the same message (never a 500); after `prefixserve migrate` the same process is ready;
- Redis stopped and the object store unreachable from the start: the server runs, /readyz names both; when they
  come back it is ready without a restart;
- PREFIXSERVE_MIGRATE_ON_START on two replicas held at the migrations' advisory lock and released together:
  the migrations run once, both serve.

The start-up log is checked too: one line per store, no credentials, never the admin key.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from app.db.migrate import current, head, upgrade
from tests.fault_services import RedisServer, TcpProxy
from tests.s3_server import S3Server
from tests.server_proc import START_TIMEOUT_S, ServerProcess

pytestmark = pytest.mark.slow

ADMIN_KEY = "readiness-test-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MIGRATION_LOCK_ID = 0x70726566  # migrations/env.py's advisory lock
WAIT_S = 30.0

Start = Callable[[dict[str, str]], ServerProcess]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """start(settings) launches a server (not waiting for it); all are stopped, their log tails printed."""
    started: list[ServerProcess] = []

    def launch(settings: dict[str, str]) -> ServerProcess:
        server = ServerProcess(tmp_path / f"server-{len(started)}.log", {
            "PREFIXSERVE_DATA_DIR": str(tmp_path / f"data-{len(started)}"), "PREFIXSERVE_ADMIN_KEY": ADMIN_KEY,
            **settings})
        started.append(server)
        return server

    yield launch
    for server in started:
        server.stop()
        print(f"--- {server.log_path.name} (tail)\n{server.log_tail()}")


def wait_alive(server: ServerProcess) -> None:
    """Until /health answers (the lifespan is done): readiness is what the test then looks at."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert server.proc.poll() is None, f"the server exited ({server.proc.returncode}):\n{server.log_tail()}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        assert time.monotonic() < deadline, f"the server did not start:\n{server.log_tail()}"
        time.sleep(0.2)


def wait_readyz(server: ServerProcess, status: int) -> dict[str, object]:
    deadline = time.monotonic() + WAIT_S
    while True:
        r = httpx.get(server.url + "/readyz", timeout=10)
        if r.status_code == status:
            body: dict[str, object] = r.json()
            return body
        assert time.monotonic() < deadline, f"/readyz stayed {r.status_code}: {r.text}"
        time.sleep(0.2)


def start_up_lines(server: ServerProcess) -> dict[str, str]:
    """The start-up log's line for each store, by name."""
    out = {}
    for line in server.log_path.read_text().splitlines():
        for name in ("database", "object store", "cache", "job queue"):
            if f"app.readiness: {name}: " in line:
                out[name] = line.split(f"app.readiness: {name}: ", 1)[1]
    return out


def test_an_empty_postgres_database_is_not_ready_until_migrated(start: Start, postgres_url: str) -> None:
    # The in-process training worker too (the default without Redis): its sweeps wait for the schema.
    server = start({"PREFIXSERVE_DATABASE_URL": postgres_url})
    wait_alive(server)
    expected = f"database at revision none, this build needs {head()}: run `prefixserve migrate`"

    r = httpx.get(server.url + "/readyz", timeout=10)
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["status"] == "not ready"
    assert body["checks"] == {"model": True, "database": True, "schema": False, "object_store": True}
    assert expected in body["details"]["schema"] and expected in body["message"]

    # Every route that needs the database: a 503 the client retries, with the same message; never a 500.
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for method, path, headers in (("POST", "/admin/tenants", ADMIN), ("GET", "/admin/tenants", ADMIN),
                                      ("GET", "/v1/models", {"Authorization": "Bearer sk-anything"}),
                                      ("POST", "/v1/completions", {"Authorization": "Bearer sk-anything"})):
            r = http.request(method, path, headers=headers, json={"name": "acme"})
            assert r.status_code == 503, (method, path, r.text)
            assert int(r.headers["Retry-After"]) > 0
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("service_unavailable", "schema_not_ready")
            assert expected in error["message"]
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200

    lines = start_up_lines(server)
    assert set(lines) == {"database", "object store", "cache", "job queue"}, lines
    assert lines["database"].startswith("NOT READY: postgresql+psycopg://127.0.0.1:5432/prefixserve_test_")
    assert expected in lines["database"]
    assert lines["object store"].endswith(": writable: ready") and lines["cache"].startswith("in-process")
    log = server.log_path.read_text()
    assert "postgres@" not in log  # no user name (nor password) in any line
    assert "Traceback" not in log and " ERROR " not in log, log  # said clearly, once, not as failures
    assert "alembic.runtime.plugins" not in log  # no plugin roll-call drowning the start-up lines

    migrate = subprocess.run([sys.executable, "-m", "app.cli", "migrate"], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "PREFIXSERVE_DATABASE_URL": postgres_url})
    assert migrate.returncode == 0, migrate.stderr

    # The same process, no restart: ready, and the API works.
    body = wait_readyz(server, 200)
    assert body["checks"] == {"model": True, "database": True, "schema": True, "object_store": True}
    r = httpx.post(server.url + "/admin/tenants", headers=ADMIN, json={"name": "acme"}, timeout=10)
    assert r.status_code == 201, r.text
    assert server.proc.poll() is None


def test_stopped_redis_and_unreachable_object_store_are_named(start: Start, postgres_url: str,
                                                             s3_server: S3Server) -> None:
    upgrade(postgres_url)
    redis_server = RedisServer()
    redis_server.kill()  # stopped before the server starts
    proxy = TcpProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    proxy.down()  # nothing listens: connections refused
    bucket = f"readiness-{int(time.time() * 1000)}"
    try:
        server = start({"PREFIXSERVE_DATABASE_URL": postgres_url, "PREFIXSERVE_REDIS_URL": redis_server.url,
                        "PREFIXSERVE_OBJECT_STORE_URL": f"s3://{bucket}/blobs",
                        "PREFIXSERVE_S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}",
                        "PREFIXSERVE_S3_ACCESS_KEY_ID": s3_server.access_key,
                        "PREFIXSERVE_S3_SECRET_ACCESS_KEY": s3_server.secret_key})
        wait_alive(server)  # it runs, saying why it is not ready, rather than exiting
        body = wait_readyz(server, 503)
        assert body["checks"] == {"model": True, "database": True, "schema": True, "object_store": False,
                                  "cache": False}
        message = str(body["message"])
        assert f"Redis redis://127.0.0.1:{redis_server.port}/0 does not answer" in message
        assert f"object store s3://{bucket}/blobs at http://127.0.0.1:{proxy.port} is not writable" in message

        lines = start_up_lines(server)
        assert lines["object store"].startswith(f"NOT READY: object store s3://{bucket}/blobs"), lines
        assert lines["cache"].startswith(f"NOT READY: Redis redis://127.0.0.1:{redis_server.port}/0"), lines
        assert lines["job queue"].startswith("NOT READY: arq on Redis"), lines
        assert lines["database"].endswith(f"at revision {head()}: ready"), lines
        assert s3_server.secret_key not in server.log_path.read_text()

        redis_server.start()
        proxy.up()
        body = wait_readyz(server, 200)  # no restart: the object store is opened on first use after all
        assert all(body["checks"].values()), body  # type: ignore[attr-defined]
    finally:
        proxy.down()
        redis_server.kill()


def test_migrate_on_start_two_replicas_at_once_migrate_once(start: Start, postgres_url: str) -> None:
    settings = {"PREFIXSERVE_DATABASE_URL": postgres_url, "PREFIXSERVE_MIGRATE_ON_START": "true",
                "PREFIXSERVE_JOB_QUEUE": "none"}
    db = sa.create_engine(postgres_url)
    try:
        # Hold the migrations' lock until both replicas wait on it: then they really migrate at the same time.
        with db.connect() as holder:
            holder.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_ID})
            servers = [start(settings), start(settings)]
            deadline = time.monotonic() + START_TIMEOUT_S
            while _lock_waiters(db) < 2:
                for s in servers:
                    assert s.proc.poll() is None, s.log_tail()
                assert time.monotonic() < deadline, "the replicas did not both reach the migration lock"
                time.sleep(0.1)
            holder.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_ID})
    finally:
        db.dispose()
    for server in servers:
        server.wait_ready()
    assert current(postgres_url) == head()
    logs = [s.log_path.read_text() for s in servers]
    assert all("PREFIXSERVE_MIGRATE_ON_START: migrating" in log for log in logs)
    assert sum(log.count("Running upgrade  -> 0001") for log in logs) == 1, "the schema was created twice"
    for i, server in enumerate(servers):
        r = httpx.post(server.url + "/admin/tenants", headers=ADMIN, json={"name": f"t{i}"}, timeout=10)
        assert r.status_code == 201, r.text


def _lock_waiters(db: sa.Engine) -> int:
    with db.connect() as conn:
        return int(conn.execute(sa.text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = :k "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
            {"k": MIGRATION_LOCK_ID}).scalar_one())
