"""Publishing a prefix version (uploads and training jobs alike) and collecting blobs no row references.

The one ordering that keeps the stores consistent: the blob is written before the row that points to it
commits, and a failure before the commit deletes the blob again unless another row references it. Version
numbers are max+1 per prefix, retried when a concurrent publisher took the number. Since the resolver reads
the catalog on every request, a committed version is servable at once on every replica.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from app.db.models import File, JobCheckpoint, Prefix, PrefixVersion
from app.errors import Conflict, Unavailable
from prefix_store.blobs import BlobStore, BlobStoreUnavailable

if TYPE_CHECKING:
    from prefix_store.types import ModelSpec

log = logging.getLogger(__name__)

T = TypeVar("T")
INSERT_ATTEMPTS = 8
# Runs inside the publishing transaction, after the version row is flushed and before the commit; raising
# aborts the publication (the training job runner marks its job succeeded here, fenced on its lease).
Finalize = Callable[[Session, PrefixVersion], None]


@dataclass(frozen=True)
class PrefixStores:
    """What prefix management needs besides the session: blobs, the served model's spec, limits, and a
    callback freeing a prefix from the cache tiers (tenant_id, prefix_id)."""

    blobs: BlobStore
    spec: ModelSpec | None
    max_virtual_tokens: int
    max_bytes: int
    invalidate: Callable[[str, str], None]


def publish_version(
    *,
    session: Session,
    blobs: BlobStore,
    tenant_id: str,
    name: str,
    native: bytes,
    values: dict[str, object],
    end_user_id: str | None = None,
    finalize: Finalize | None = None,
) -> tuple[Prefix, PrefixVersion]:
    """Store `native` (a native-format prefix) as the next version of `name`: the blob first, then one
    transaction inserting the PrefixVersion (and the Prefix for a new name; a personal prefix gets
    `end_user_id`). `values`: the version's other columns (num_virtual_tokens, source_format, ...).

    Raise Unavailable when the object store cannot be written; whatever `finalize` raises aborts it all.
    """
    def commit(sha: str) -> tuple[Prefix, PrefixVersion]:
        return insert_version(
            session, tenant_id=tenant_id, name=name, end_user_id=end_user_id, finalize=finalize,
            values={"sha256": sha, "size_bytes": len(native), **values},
        )

    return store_blob_then_commit(session=session, blobs=blobs, data=native, commit=commit)


def store_blob_then_commit(
    *, session: Session, blobs: BlobStore, data: bytes, commit: Callable[[str], T]
) -> T:
    """Write `data` as a blob, then run `commit(sha256)` (which commits the rows pointing at it).

    Unavailable (503) when the object store cannot be written; if `commit` raises, the blob is deleted again
    unless another row references it. After the commit the blob is written once more, because a concurrent
    delete of an identical blob may have collected it in between (a failure there is only logged: the row is
    committed and the next identical write restores the blob).
    """
    try:
        sha = blobs.put(data)
    except BlobStoreUnavailable as exc:
        log.error("blob store write failed: %s", exc)
        raise Unavailable("the object store is unavailable; retry shortly", headers={"Retry-After": "5"}) from None
    try:
        result = commit(sha)
    except BaseException:
        session.rollback()
        delete_unreferenced_blobs(session=session, blobs=blobs, shas=[sha])
        raise
    try:
        blobs.put(data)
    except BlobStoreUnavailable as exc:
        log.warning("could not re-write blob %s after its row committed: %s", sha, exc)
    return result


def insert_version(
    session: Session,
    *,
    tenant_id: str,
    name: str,
    values: dict[str, object],
    end_user_id: str | None = None,
    finalize: Finalize | None = None,
) -> tuple[Prefix, PrefixVersion]:
    """Insert version max+1 and commit, retrying when a concurrent publisher took the number
    (UNIQUE(prefix_id, version)), created the prefix first (UNIQUE(tenant_id, name)), or held SQLite's
    write lock. Anything else (including what `finalize` raises) is rolled back and propagates."""
    for attempt in range(INSERT_ATTEMPTS):
        try:
            prefix = find_prefix(session, tenant_id, name, end_user_id=end_user_id)
            if prefix is None:
                prefix = Prefix(tenant_id=tenant_id, name=name, end_user_id=end_user_id)
                session.add(prefix)
                session.flush()
            latest = session.execute(
                sa.select(sa.func.max(PrefixVersion.version)).where(PrefixVersion.prefix_id == prefix.id)
            ).scalar()
            row = PrefixVersion(prefix_id=prefix.id, version=(latest or 0) + 1, **values)
            session.add(row)
            session.flush()
            if finalize is not None:
                finalize(session, row)
            session.commit()
            return prefix, row
        except (IntegrityError, OperationalError) as exc:
            session.rollback()
            retryable = isinstance(exc, IntegrityError) or "locked" in str(exc.orig)
            if not retryable or attempt == INSERT_ATTEMPTS - 1:
                if retryable:
                    raise Conflict(f"concurrent updates of prefix {name!r}; retry", code="conflict") from None
                raise
            time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
        except BaseException:
            session.rollback()
            raise
    raise AssertionError("unreachable")


def find_prefix(session: Session, tenant_id: str, name: str, *, end_user_id: str | None = None) -> Prefix | None:
    """The tenant's prefix `name` (end_user_id None), or the end user's personal prefix."""
    owner = Prefix.end_user_id.is_(None) if end_user_id is None else Prefix.end_user_id == end_user_id
    return session.execute(
        sa.select(Prefix).where(Prefix.tenant_id == tenant_id, Prefix.name == name, owner)
    ).scalar_one_or_none()


def blob_referenced(session: Session, sha256: str) -> bool:
    """Whether any row (of any tenant) points to the blob: prefix versions, files, training checkpoints."""
    return any(
        session.execute(sa.select(sa.literal(1)).where(col == sha256).limit(1)).first() is not None
        for col in (PrefixVersion.sha256, File.sha256, JobCheckpoint.sha256)
    )


def delete_unreferenced_blobs(
    *, session: Session, shas: Iterable[str], stores: PrefixStores | None = None, blobs: BlobStore | None = None
) -> None:
    """Delete each blob no row references (from `blobs`, or `stores.blobs`). A failure only leaves an orphan
    blob behind (logged)."""
    store = blobs if blobs is not None else stores.blobs if stores is not None else None
    if store is None:
        raise TypeError("delete_unreferenced_blobs needs `blobs` or `stores`")
    for sha in sorted(set(shas)):
        try:
            if not blob_referenced(session, sha):
                store.delete(sha)
        except (BlobStoreUnavailable, sa.exc.SQLAlchemyError) as exc:
            log.warning("could not collect blob %s (left as an orphan): %s", sha, exc)
    session.rollback()  # end the read transaction
