"""What every blob store shares: content addresses, the two errors, and the `BlobStore` protocol."""

from __future__ import annotations

import hashlib
import re
from typing import Protocol, runtime_checkable

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
