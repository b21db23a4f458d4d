"""Blob stores against real backends: a temp directory and SeaweedFS S3 (tests/s3_server.py)."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from prefix_store.blobs import (
    BlobNotFound,
    BlobStore,
    BlobStoreUnavailable,
    FileBlobStore,
    S3BlobStore,
    open_blob_store,
)
from tests.s3_server import S3Server, closed_port


def s3_store(server: S3Server, bucket: str | None = None, prefix: str = "blobs") -> S3BlobStore:
    return S3BlobStore(
        bucket or f"test-{uuid.uuid4().hex[:12]}",
        prefix,
        endpoint_url=server.endpoint_url,
        access_key=server.access_key,
        secret_key=server.secret_key,
    )


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "file":
        return FileBlobStore(tmp_path / "blobs")
    return s3_store(request.getfixturevalue("s3_server"))


def test_put_get_roundtrip(store: BlobStore) -> None:
    data = os.urandom(100_000)
    sha = store.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.exists(sha)
    assert store.get(sha) == data
    assert store.put(b"") == hashlib.sha256(b"").hexdigest()
    assert store.get(hashlib.sha256(b"").hexdigest()) == b""


def test_put_is_idempotent_and_dedupes(store: BlobStore) -> None:
    data = b"the same prefix, uploaded twice"
    writes = _count_writes(store)
    assert store.put(data) == store.put(data)
    assert writes() == 1
    assert store.get(hashlib.sha256(data).hexdigest()) == data


def _count_writes(store: BlobStore) -> Any:
    """How many times the backend really wrote (observed, not mocked)."""
    if isinstance(store, S3BlobStore):
        calls: list[object] = []
        store._client.meta.events.register("before-call.s3.PutObject", lambda **kw: calls.append(kw))
        return lambda: len(calls)
    assert isinstance(store, FileBlobStore)
    return lambda: sum(1 for p in store.root.rglob("*") if p.is_file())


def test_delete(store: BlobStore) -> None:
    sha = store.put(b"doomed")
    store.delete(sha)
    assert not store.exists(sha)
    with pytest.raises(BlobNotFound):
        store.get(sha)
    store.delete(sha)  # absent: no-op


def test_not_found(store: BlobStore) -> None:
    missing = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(missing)
    with pytest.raises(BlobNotFound):
        store.get(missing)


@pytest.mark.parametrize(
    "bad",
    ["../../../../etc/passwd", "ab/../../cd", "A" * 64, "a" * 63, "a" * 65, "g" * 64, "", "/" + "a" * 63],
)
def test_hash_validation_refuses_traversal(store: BlobStore, bad: str) -> None:
    for op in (store.get, store.exists, store.delete):
        with pytest.raises(ValueError, match="invalid blob hash"):
            op(bad)


def test_file_layout(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    sha = store.put(b"x")
    assert store.path_for(sha) == tmp_path / sha[:2] / sha[2:4] / sha
    assert (tmp_path / sha[:2] / sha[2:4] / sha).read_bytes() == b"x"


def test_crash_mid_write_leaves_no_visible_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileBlobStore(tmp_path)
    data = os.urandom(10_000)
    sha = hashlib.sha256(data).hexdigest()

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(BlobStoreUnavailable):
        store.put(data)
    monkeypatch.undo()
    assert not store.exists(sha)
    with pytest.raises(BlobNotFound):
        store.get(sha)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # the temp file was cleaned up too
    # A later put succeeds normally.
    assert store.put(data) == sha
    assert store.get(sha) == data


def test_temp_leftovers_are_never_served(tmp_path: Path) -> None:
    """A hard crash (no cleanup) leaves only a temp name, which no valid hash can address."""
    store = FileBlobStore(tmp_path)
    sha = hashlib.sha256(b"half").hexdigest()
    d = tmp_path / sha[:2] / sha[2:4]
    d.mkdir(parents=True)
    (d / f".tmp-{sha}.part").write_bytes(b"ha")
    assert not store.exists(sha)


def test_s3_bucket_created_and_prefix_used(s3_server: S3Server) -> None:
    bucket = f"fresh-{uuid.uuid4().hex[:12]}"
    store = s3_store(s3_server, bucket, prefix="/tenants/blobs/")
    sha = store.put(b"in a prefix")
    listed = store._client.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listed["Contents"]] == [f"tenants/blobs/{sha}"]
    # Opening again on an existing bucket is fine and sees the same blob.
    assert s3_store(s3_server, bucket, prefix="tenants/blobs").get(sha) == b"in a prefix"


def test_s3_unreachable_raises_unavailable() -> None:
    with pytest.raises(BlobStoreUnavailable, match="unreachable"):
        S3BlobStore(
            "b",
            endpoint_url=f"http://127.0.0.1:{closed_port()}",
            access_key="x",
            secret_key="y",
            connect_timeout_s=1,
            max_attempts=1,
        )


def test_s3_wrong_secret_is_refused(s3_server: S3Server) -> None:
    """Signing is really checked: a wrong secret must not read or create anything."""
    with pytest.raises(BlobStoreUnavailable):
        S3BlobStore(
            f"nope-{uuid.uuid4().hex[:8]}",
            endpoint_url=s3_server.endpoint_url,
            access_key=s3_server.access_key,
            secret_key="wrong-secret",
            max_attempts=1,
        )


def test_open_blob_store(tmp_path: Path, s3_server: S3Server) -> None:
    a = open_blob_store(f"file://{tmp_path}/a")
    assert isinstance(a, FileBlobStore) and a.root == tmp_path / "a"
    b = open_blob_store(str(tmp_path / "b"))
    assert isinstance(b, FileBlobStore) and b.root == tmp_path / "b"
    bucket = f"url-{uuid.uuid4().hex[:8]}"
    s = open_blob_store(
        f"s3://{bucket}/some/prefix",
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    assert isinstance(s, S3BlobStore) and (s.bucket, s.prefix) == (bucket, "some/prefix")
    assert s.get(s.put(b"via url")) == b"via url"
    for bad in ("relative/path", "http://x/y", "s3:///nobucket", "file://host/path"):
        with pytest.raises(ValueError):
            open_blob_store(bad)
