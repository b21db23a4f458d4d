"""Prefix and tenant services on the production stores (PostgreSQL + S3) and under concurrency/failure.

No model is loaded here: a ModelSpec of the same shape as the codec tests' tiny Llama is enough for the
codec; the API tests cover the real model.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import PrefixVersion
from app.errors import InvalidRequest, NotFound
from app.services import prefixes, tenants
from prefix_store.blobs import BlobStore, FileBlobStore, open_blob_store
from prefix_store.codec import decode_native, sha256_hex
from prefix_store.peft_codec import decode_peft_zip
from prefix_store.types import ModelSpec
from tests.api.fixtures_admin import native_bytes
from tests.s3_server import S3Server

SPEC = ModelSpec(model_id="tiny", fingerprint="fp-tiny", num_layers=2, num_kv_heads=2, head_dim=16,
                 dtype="float32")


def _stores(blobs: BlobStore, invalidated: list[tuple[str, str]]) -> prefixes.PrefixStores:
    return prefixes.PrefixStores(blobs=blobs, spec=SPEC, max_virtual_tokens=64, max_bytes=1 << 20,
                                 invalidate=lambda t, p: invalidated.append((t, p)))


def test_upload_list_download_delete_on_postgres_and_s3(
    pg_sessions: sessionmaker[Session], s3_server: S3Server
) -> None:
    blobs = open_blob_store(f"s3://svc-{uuid.uuid4().hex[:10]}/blobs", endpoint_url=s3_server.endpoint_url,
                            access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    invalidated: list[tuple[str, str]] = []
    stores = _stores(blobs, invalidated)
    v1, v2 = native_bytes(SPEC, seed=1), native_bytes(SPEC, 3, seed=2)
    with pg_sessions() as s:
        tenant = tenants.create_tenant(session=s, name="acme")
        up1 = prefixes.upload_prefix(session=s, stores=stores, tenant_id=tenant.id, name="p",
                                     files=[("p.safetensors", v1)])
        up2 = prefixes.upload_prefix(session=s, stores=stores, tenant_id=tenant.id, name="p",
                                     files=[("p.safetensors", v2)])
        assert (up1.version, up2.version, up2.num_virtual_tokens) == (1, 2, 3)
        assert blobs.exists(up1.sha256) and up1.sha256 == sha256_hex(v1)

        listed = prefixes.list_prefixes(session=s, tenant_id=tenant.id)
        assert [(p.name, p.latest_version) for p in listed] == [("p", 2)]
        got = prefixes.download_prefix(session=s, stores=stores, tenant_id=tenant.id, ref="p@1", fmt="native")
        assert got.data == v1
        z = prefixes.download_prefix(session=s, stores=stores, tenant_id=tenant.id, ref="p", fmt="peft")
        kv, _ = decode_peft_zip(z.data, spec=SPEC, max_virtual_tokens=64, max_bytes=1 << 20)
        assert kv.keys.equal(decode_native(v2, spec=SPEC, max_virtual_tokens=64, max_bytes=1 << 20).keys)

        prefixes.delete_prefix(session=s, stores=stores, tenant_id=tenant.id, ref="p@1")
        assert not blobs.exists(up1.sha256) and blobs.exists(up2.sha256)
        prefixes.delete_prefix(session=s, stores=stores, tenant_id=tenant.id, ref="p")
        assert not blobs.exists(up2.sha256)
        assert invalidated == [(tenant.id, up1.id)] * 2
        with pytest.raises(NotFound):
            prefixes.get_prefix(session=s, tenant_id=tenant.id, ref="p")

        prefixes.upload_prefix(session=s, stores=stores, tenant_id=tenant.id, name="q",
                               files=[("q.safetensors", v1)])
        tenants.delete_tenant(session=s, stores=stores, tenant_id=tenant.id)
        assert not blobs.exists(up1.sha256)
        assert s.scalar(sa.select(sa.func.count()).select_from(PrefixVersion)) == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_concurrent_uploads_get_distinct_versions(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    sessions: sessionmaker[Session] = request.getfixturevalue(f"{'pg' if backend == 'postgres' else 'sqlite'}"
                                                              "_sessions")
    stores = _stores(FileBlobStore(tmp_path / "blobs"), [])
    with sessions() as s:
        tenant_id = tenants.create_tenant(session=s, name="acme").id
    n = 8
    versions: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def upload(i: int) -> None:
        try:
            barrier.wait()
            with sessions() as s:
                out = prefixes.upload_prefix(session=s, stores=stores, tenant_id=tenant_id, name="hot",
                                             files=[("p.safetensors", native_bytes(SPEC, seed=i))])
            versions.append(out.version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(versions) == list(range(1, n + 1))


def test_failed_commit_deletes_only_unreferenced_blob(
    sqlite_sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    stores = _stores(blobs, [])
    shared, fresh = native_bytes(SPEC, seed=1), native_bytes(SPEC, seed=2)
    with sqlite_sessions() as s:
        tenant_id = tenants.create_tenant(session=s, name="acme").id
        prefixes.upload_prefix(session=s, stores=stores, tenant_id=tenant_id, name="kept",
                               files=[("p", shared)])

        def broken_commit() -> None:
            raise sa.exc.OperationalError("COMMIT", {}, Exception("disk I/O error"))

        monkeypatch.setattr(s, "commit", broken_commit)
        for data in (shared, fresh):
            with pytest.raises(sa.exc.OperationalError):
                prefixes.upload_prefix(session=s, stores=stores, tenant_id=tenant_id, name="new",
                                       files=[("p", data)])
        assert blobs.exists(sha256_hex(shared)) and not blobs.exists(sha256_hex(fresh))
        with pytest.raises(InvalidRequest):  # and a failed validation writes nothing
            prefixes.upload_prefix(session=s, stores=stores, tenant_id=tenant_id, name="x",
                                   files=[("p", b"junk")])
    assert sorted(p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()) == [sha256_hex(shared)]
