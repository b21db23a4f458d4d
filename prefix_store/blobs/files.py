"""Blobs in a local directory: the embedded default."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from prefix_store.blobs.base import BlobNotFound, BlobStoreUnavailable, sha256_hex, validate_sha256


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
