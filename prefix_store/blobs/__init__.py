"""Object stores for prefix blobs: the durable tier (docs/storage.md).

Blobs are content-addressed: the key of a blob is the sha256 hex of its bytes, so re-uploading the same prefix
writes nothing new (dedupe), and a blob is immutable once written. The database row that points to a blob is
committed only after `put` returns, so a reader never follows a row to a missing or half-written blob.

Two backends: a local directory (the embedded default) and any S3-compatible store (production).

One module per part: base.py (addresses, errors, the protocol), files.py (a directory), s3.py (S3); import from
here.
"""

from __future__ import annotations

from urllib.parse import urlparse

from prefix_store.blobs.base import BlobNotFound, BlobStore, BlobStoreUnavailable, sha256_hex, validate_sha256
from prefix_store.blobs.files import FileBlobStore
from prefix_store.blobs.s3 import S3BlobStore

__all__ = [
    "BlobNotFound",
    "BlobStore",
    "BlobStoreUnavailable",
    "FileBlobStore",
    "S3BlobStore",
    "open_blob_store",
    "sha256_hex",
    "validate_sha256",
]


def open_blob_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str = "us-east-1",
) -> BlobStore:
    """Open the store named by `url`: `file:///abs/path`, `/abs/path`, or `s3://bucket[/prefix]`.

    The S3 options (from Settings.s3_*) apply to s3:// URLs only. Raise ValueError for any other form,
    BlobStoreUnavailable if the backend cannot be reached or created.
    """
    if url.startswith("/"):
        return FileBlobStore(url)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ValueError(f"file URL must be file:///absolute/path, got {url!r}")
        return FileBlobStore(parsed.path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"s3 URL must name a bucket: s3://bucket[/prefix], got {url!r}")
        return S3BlobStore(
            parsed.netloc,
            parsed.path,
            endpoint_url=endpoint_url,
            access_key=access_key,
            secret_key=secret_key,
            region=region,
        )
    raise ValueError(f"unsupported object store URL {url!r}: use s3://bucket[/prefix], file:///path or /path")
