"""Blobs in any S3-compatible object store (production): AWS, MinIO, SeaweedFS, ..."""

from __future__ import annotations

import base64
import hashlib
import logging
from typing import TYPE_CHECKING, Any

from prefix_store.blobs.base import BlobNotFound, BlobStoreUnavailable, sha256_hex, validate_sha256

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

# The error codes of an absent object: GET answers NoSuchKey, HEAD a bare 404 (some servers: NotFound).
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


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
            if _error_code(exc) in _MISSING:
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
            if _error_code(exc) in _MISSING:
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
