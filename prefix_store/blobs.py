"""Object stores for prefix blobs: the durable tier (docs/storage.md).

Blobs are content-addressed: the key of a blob is the sha256 hex of its bytes, so re-uploading the same prefix
writes nothing new (dedupe), and a blob is immutable once written. The database row that points to a blob is
committed only after `put` returns, so a reader never follows a row to a missing or half-written blob.

Two backends: a local directory (the embedded default) and any S3-compatible store (production).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlparse

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of `data`: the content address of a blob."""
    return hashlib.sha256(data).hexdigest()


class BlobNotFound(KeyError):
    """No blob with this hash exists in the store."""


class BlobStoreUnavailable(RuntimeError):
    """The backend is unreachable or failing (network, permissions, disk): an outage, not a missing blob."""


def validate_sha256(sha256: str) -> str:
    """Return `sha256` if it is 64 lowercase hex digits, else raise ValueError.

    Hashes become file paths and object keys: refusing anything else rules out path traversal (`../`) and
    keys that no `put` could have produced.
    """
    if not isinstance(sha256, str) or _SHA256_RE.fullmatch(sha256) is None:
        raise ValueError(f"invalid blob hash {sha256!r}: expected 64 lowercase hex digits")
    return sha256


@runtime_checkable
class BlobStore(Protocol):
    """A content-addressed, synchronous blob store. Implementations are thread-safe."""

    def put(self, data: bytes) -> str:
        """Store `data`; return its sha256 hex. Writing an existing blob is a no-op."""
        ...

    def get(self, sha256: str) -> bytes:
        """The bytes of the blob; raise BlobNotFound if absent, BlobStoreUnavailable if unreachable."""
        ...

    def exists(self, sha256: str) -> bool:
        """Whether the blob exists."""
        ...

    def delete(self, sha256: str) -> None:
        """Remove the blob; deleting an absent blob is a no-op."""
        ...


class FileBlobStore:
    """Blobs as files under `root/ab/cd/<sha256>` (two fan-out levels keep directories small)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BlobStoreUnavailable(f"cannot create blob directory {self.root}: {exc}") from exc

    def __repr__(self) -> str:
        return f"FileBlobStore({str(self.root)!r})"

    def path_for(self, sha256: str) -> Path:
        """Where the blob with this hash lives (validated: never outside `root`)."""
        validate_sha256(sha256)
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put(self, data: bytes) -> str:
        sha256 = sha256_hex(data)
        path = self.path_for(sha256)
        if path.exists():
            return sha256  # content-addressed: same hash, same bytes
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_atomically(path, data)
        except OSError as exc:
            raise BlobStoreUnavailable(f"cannot write blob {sha256} under {self.root}: {exc}") from exc
        return sha256

    @staticmethod
    def _write_atomically(path: Path, data: bytes) -> None:
        """Write to a temp file in the same directory, fsync, then rename over the final name.

        os.replace is atomic within one file system, so readers see either no blob or the whole blob, even if
        the process dies mid-write; the temp name never matches a hash, so leftovers are never served.
        """
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # fsync the directory so the rename itself survives a power loss (POSIX only).
        with contextlib.suppress(OSError):
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def get(self, sha256: str) -> bytes:
        path = self.path_for(sha256)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None
        except OSError as exc:
            raise BlobStoreUnavailable(f"cannot read blob {sha256} under {self.root}: {exc}") from exc

    def exists(self, sha256: str) -> bool:
        path = self.path_for(sha256)
        try:
            return path.is_file()
        except OSError as exc:
            raise BlobStoreUnavailable(f"cannot stat blob {sha256} under {self.root}: {exc}") from exc

    def delete(self, sha256: str) -> None:
        path = self.path_for(sha256)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise BlobStoreUnavailable(f"cannot delete blob {sha256} under {self.root}: {exc}") from exc


class S3BlobStore:
    """Blobs as objects `<prefix>/<sha256>` in an S3 bucket (AWS, MinIO, SeaweedFS, ...).

    S3 PUTs are atomic (an object is visible whole or not at all), so no temp-and-rename is needed.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        # boto3 is heavy: only an s3:// store imports it (the embedded default is a directory)
        import boto3
        from botocore.config import Config  # the same reason

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self._client: S3Client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
            config=Config(
                connect_timeout=connect_timeout_s,
                read_timeout=read_timeout_s,
                retries={"max_attempts": max_attempts, "mode": "standard"},
                # Path-style addressing: S3-compatible servers rarely have wildcard DNS for buckets.
                s3={"addressing_style": "path"},
            ),
        )
        self._ensure_bucket(region)

    def __repr__(self) -> str:
        return f"S3BlobStore({self.bucket!r}, {self.prefix!r}, endpoint_url={self.endpoint_url!r})"

    def _where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint_url or 'AWS'}"

    def _ensure_bucket(self, region: str) -> None:
        """Create the bucket if missing, so a fresh deployment works; fail clearly if S3 cannot be reached."""
        from botocore.exceptions import BotoCoreError, ClientError  # heavy: only an s3:// store needs it

        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
                raise BlobStoreUnavailable(f"cannot access {self._where()}: {exc}") from exc
        except BotoCoreError as exc:
            raise BlobStoreUnavailable(f"S3 endpoint unreachable for {self._where()}: {exc}") from exc
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region != "us-east-1":  # AWS rejects an explicit us-east-1 location constraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
            log.info("created bucket %s", self._where())
        except ClientError as exc:
            if _error_code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise BlobStoreUnavailable(f"cannot create bucket {self._where()}: {exc}") from exc
        except BotoCoreError as exc:
            raise BlobStoreUnavailable(f"S3 endpoint unreachable for {self._where()}: {exc}") from exc

    def key_for(self, sha256: str) -> str:
        """The object key of a blob (validated hash)."""
        validate_sha256(sha256)
        return f"{self.prefix}/{sha256}" if self.prefix else sha256

    def put(self, data: bytes) -> str:
        from botocore.exceptions import BotoCoreError, ClientError  # heavy: only an s3:// store needs it

        sha256 = sha256_hex(data)
        key = self.key_for(sha256)
        if self.exists(sha256):
            return sha256  # dedupe: skip the upload
        # ContentMD5 makes the server verify the body, so a corrupted upload is rejected, not stored.
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentMD5=md5, ContentType="application/octet-stream"
            )
        except (ClientError, BotoCoreError) as exc:
            raise BlobStoreUnavailable(f"cannot write blob {sha256} to {self._where()}: {exc}") from exc
        return sha256

    def get(self, sha256: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError  # heavy: only an s3:// store needs it

        key = self.key_for(sha256)
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            return data
        except ClientError as exc:
            if _error_code(exc) in {"NoSuchKey", "404", "NotFound"}:
                raise BlobNotFound(sha256) from None
            raise BlobStoreUnavailable(f"cannot read blob {sha256} from {self._where()}: {exc}") from exc
        except BotoCoreError as exc:
            raise BlobStoreUnavailable(f"cannot read blob {sha256} from {self._where()}: {exc}") from exc

    def exists(self, sha256: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError  # heavy: only an s3:// store needs it

        key = self.key_for(sha256)
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if _error_code(exc) in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise BlobStoreUnavailable(f"cannot stat blob {sha256} in {self._where()}: {exc}") from exc
        except BotoCoreError as exc:
            raise BlobStoreUnavailable(f"cannot stat blob {sha256} in {self._where()}: {exc}") from exc

    def delete(self, sha256: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError  # heavy: only an s3:// store needs it

        key = self.key_for(sha256)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)  # absent key: S3 answers 204 anyway
        except (ClientError, BotoCoreError) as exc:
            raise BlobStoreUnavailable(f"cannot delete blob {sha256} from {self._where()}: {exc}") from exc


def _error_code(exc: Exception) -> str:
    """The S3 error code of a botocore ClientError ('' if none)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


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
