"""The schema gate and the readiness helpers, in process (the real-process tests are tests/test_readiness.py).

- the gate re-reads a behind schema at most once per interval however many requests arrive, lets requests
  through once the schema is at head and never reads it again; a newer (unknown) revision is served;
- the app on a database URL that was never migrated: every API route 503 + Retry-After + the message, probes
  and docs answered; migrated meanwhile: served without a restart; PREFIXSERVE_MIGRATE_ON_START: served at once;
- descriptions of services carry no credentials; an object store unreachable at start-up is opened on use.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.config import Settings
from app.db.migrate import head, upgrade
from app.main import create_app
from app.readiness import DeferredBlobStore, StoreChecks, describe_url
from app.runtime import open_runtime
from app.schema_gate import SchemaGate
from prefix_store.blobs import BlobStore, BlobStoreUnavailable, FileBlobStore

ADMIN = {"Authorization": "Bearer gate-admin-key"}
KNOWN = frozenset({"0001", "0002", "0003"})


class Reader:
    """A revision reader that counts its reads (and may be told to fail)."""

    def __init__(self, revision: str | None) -> None:
        self.revision = revision
        self.reads = 0
        self.fail = False
        self._lock = threading.Lock()

    def __call__(self) -> str | None:
        with self._lock:
            self.reads += 1
        if self.fail:
            raise sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))
        return self.revision


async def _admitted_within(gate: SchemaGate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not await gate.admit():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_gate_rechecks_at_most_once_per_interval_then_stops_checking() -> None:
    reader = Reader(None)
    gate = SchemaGate(reader, head="0003", known=KNOWN, recheck_interval_s=60.0)
    assert not gate.check().ok and reader.reads == 1
    assert gate.state.message == ("database at revision none, this build needs 0003: run `prefixserve migrate` "
                                  "(or start the server with PREFIXSERVE_MIGRATE_ON_START=true)")
    # A burst of requests within the interval: all refused, no further read.
    assert not any(await asyncio.gather(*(gate.admit() for _ in range(50))))
    assert reader.reads == 1

    gate.recheck_interval_s = 0.05
    reader.revision = "0002"
    assert not await _admitted_within(gate, 0.3)
    assert gate.state.message.startswith("database at revision 0002, this build needs 0003")
    reader.revision = "0003"
    assert await _admitted_within(gate, 10.0)
    reads = reader.reads
    reader.fail = True  # once at head, the gate never reads again: a later outage is not its business
    assert all(await asyncio.gather(*(gate.admit() for _ in range(20))))
    assert gate.check().ok and reader.reads == reads


async def test_gate_reports_an_unreachable_database_and_serves_a_newer_schema() -> None:
    reader = Reader(None)
    reader.fail = True
    gate = SchemaGate(reader, head="0003", known=KNOWN, recheck_interval_s=0.0)
    state = gate.check()
    assert not state.ok and "the database does not answer (OperationalError)" in state.message
    # Migrated by a newer release (a revision this build does not know): the older replicas keep serving.
    reader.fail, reader.revision = False, "0004"
    assert await gate.admit() and gate.state.revision == "0004"


def _unmigrated_settings(tmp_path: Path, **extra: object) -> Settings:
    # A database URL (not the embedded default), so nothing migrates it unless asked.
    return Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'shared.db'}",
                    admin_key="gate-admin-key", **extra)  # type: ignore[arg-type]


def test_app_on_an_unmigrated_database_answers_503_until_migrated(tmp_path: Path) -> None:
    settings = _unmigrated_settings(tmp_path)
    app = create_app(settings, runtime_factory=lambda s: open_runtime(s, load_model=False))
    expected = f"database at revision none, this build needs {head()}: run `prefixserve migrate`"
    with TestClient(app) as client:
        for method, path in (("POST", "/admin/tenants"), ("GET", "/v1/models"), ("GET", "/v1/prefixes"),
                             ("POST", "/v1/chat/completions"), ("GET", "/no/such/route")):
            r = client.request(method, path, headers=ADMIN, json={"name": "acme"})
            assert r.status_code == 503, (method, path, r.text)
            assert r.headers["Retry-After"] == "5"
            assert r.json()["error"]["code"] == "schema_not_ready" and expected in r.json()["error"]["message"]
        for path in ("/health", "/healthz", "/metrics", "/openapi.json", "/docs", "/console/"):
            assert client.get(path).status_code == 200, path  # the console's pages show the API's 503 themselves
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["schema"] is False
        assert expected in ready.json()["message"]

        upgrade(settings.resolved_database_url)  # `prefixserve migrate`, from another process in production
        deadline = time.monotonic() + 10
        while (r := client.post("/admin/tenants", headers=ADMIN, json={"name": "acme"})).status_code == 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        assert r.status_code == 201, r.text
        assert client.get("/readyz").json()["checks"]["schema"] is True


def test_migrate_on_start_migrates_a_database_url(tmp_path: Path) -> None:
    settings = _unmigrated_settings(tmp_path, migrate_on_start=True)
    app = create_app(settings, runtime_factory=lambda s: open_runtime(s, load_model=False))
    with TestClient(app) as client:
        assert client.post("/admin/tenants", headers=ADMIN, json={"name": "acme"}).status_code == 201
        assert client.get("/readyz").json()["checks"]["schema"] is True


@pytest.mark.parametrize(("url", "described"), [
    ("postgresql+psycopg://app:s3cret@db.example:5432/prefixserve?sslmode=require&password=x",
     "postgresql+psycopg://db.example:5432/prefixserve"),
    ("redis://:s3cret@redis:6379/0", "redis://redis:6379/0"),
    ("rediss://user:s3cret@[::1]:6380/2", "rediss://[::1]:6380/2"),
    ("sqlite:////var/lib/prefixserve/prefixserve.db", "sqlite:////var/lib/prefixserve/prefixserve.db"),
    ("s3://bucket/blobs", "s3://bucket/blobs"),
])
def test_describe_url_drops_credentials(url: str, described: str) -> None:
    assert describe_url(url) == described


def test_deferred_blob_store_opens_on_use_once_reachable(tmp_path: Path) -> None:
    opened: list[BlobStore] = []
    reachable = threading.Event()

    def opener() -> BlobStore:
        if not reachable.is_set():
            raise BlobStoreUnavailable("S3 endpoint unreachable")
        opened.append(FileBlobStore(tmp_path))
        return opened[-1]

    store = DeferredBlobStore(opener, "S3 endpoint unreachable", retry_interval_s=0.0)
    with pytest.raises(BlobStoreUnavailable, match="unreachable"):
        store.put(b"x")
    reachable.set()
    sha = store.put(b"x")
    assert store.get(sha) == b"x" and store.exists(sha)
    store.delete(sha)
    assert not store.exists(sha) and len(opened) == 1


class RefusingStore(FileBlobStore):
    """Reads work, writes fail (a read-only bucket, a full disk) or hang until released."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.hang = threading.Event()
        self.release = threading.Event()

    def put(self, data: bytes) -> str:
        if self.hang.is_set():
            self.release.wait(30)
        raise BlobStoreUnavailable("cannot write blob: read-only file system")


def test_object_store_check_writes_and_names_a_store_that_refuses(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, object_store_url=f"file://{tmp_path / 'blobs'}")
    good = StoreChecks(settings, FileBlobStore(tmp_path / "blobs"))
    assert good.object_store().ok
    assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []  # the probe blob is deleted
    assert good.cache() is None  # no Redis configured: nothing to check

    refusing = RefusingStore(tmp_path / "blobs")
    check = StoreChecks(settings, refusing).object_store()
    assert not check.ok
    assert check.detail.startswith(f"object store file://{tmp_path / 'blobs'} is not writable (cannot write blob")

    refusing.hang.set()  # a store that hangs: the check answers anyway, within its bound
    checks = StoreChecks(settings, refusing)
    checks._object_store.timeout_s = 0.2
    try:
        assert "no answer within 0.2 s" in checks.object_store().detail
    finally:
        refusing.release.set()
