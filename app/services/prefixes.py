"""A tenant's prefixes: upload (new version), list, get, delete, download. Keyword-only functions.

Every query is scoped by tenant_id, and another tenant's prefix is reported exactly like a missing one.
Ordering that keeps the stores consistent: the blob is written before the row that points to it commits;
a delete commits first (from then on the resolver, which always reads the catalog, no longer serves it),
then deletes blobs no row references any more and frees the cache tiers.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.catalog.refs import InvalidRef, split_ref
from app.catalog.versions import PrefixStores as PrefixStores
from app.catalog.versions import blob_referenced as blob_referenced
from app.catalog.versions import delete_unreferenced_blobs as delete_unreferenced_blobs
from app.catalog.versions import find_prefix, publish_version
from app.db.models import PERSONAL_PREFIX_PREFIX, Prefix, PrefixVersion
from app.errors import Conflict, InvalidRequest, NotFound, Unavailable
from app.protocol.prefixes import PrefixDeleted, PrefixInfo, PrefixUploaded, PrefixVersionInfo
from app.services.limits import Limits, check_new_prefix
from app.services.uploads import convert_upload
from app.threads import run_in_own_thread
from prefix_store.blobs import BlobNotFound, BlobStoreUnavailable
from prefix_store.kinds import PREFIX_KINDS, PrefixKind

if TYPE_CHECKING:
    from prefix_store.types import ModelSpec

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
DownloadFormat = Literal["native", "peft"]


@dataclass(frozen=True)
class Download:
    filename: str
    media_type: str
    data: bytes


def validate_name(name: str) -> str:
    """A prefix name: lowercase letters, digits, `.`, `_`, `-`; starts with a letter or digit; <= 64."""
    if name.startswith(PERSONAL_PREFIX_PREFIX):
        raise InvalidRequest(f"prefix names starting with {PERSONAL_PREFIX_PREFIX!r} are reserved for end "
                             "users' personal prefixes", param="name", code="invalid_name")
    if NAME_RE.fullmatch(name) is None:
        raise InvalidRequest(
            f"invalid prefix name {name[:80]!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit", param="name", code="invalid_name")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`name` or `name@version` -> (name, version or None); 400 invalid_name for a bad name or version."""
    try:
        name, version = split_ref(ref)
    except InvalidRef as exc:
        raise InvalidRequest(str(exc), param="name", code="invalid_name") from None
    return validate_name(name), version


def require_model(stores: PrefixStores) -> ModelSpec:
    if stores.spec is None:
        raise Unavailable("the model is not loaded yet", headers={"Retry-After": "5"})
    return stores.spec


def _missing(name: str, version: int | None) -> NotFound:
    return NotFound(f"no prefix {name!r}" if version is None else f"no prefix {name!r} version {version}")


def upload_prefix(
    *, session: Session, stores: PrefixStores, tenant_id: str, name: str, files: list[tuple[str, bytes]],
    limits: Limits | None = None,
) -> PrefixUploaded:
    """Store an upload as the next version of `name` (version 1 for a new name), within the tenant's
    max_prefixes and max_stored_bytes (`limits`; None = unchecked)."""
    name = validate_name(name)
    spec = require_model(stores)
    # Torch work on a thread that ends, not the request thread: see app/threads.py (OpenMP pools).
    converted = run_in_own_thread(
        lambda: convert_upload(files, spec=spec, max_virtual_tokens=stores.max_virtual_tokens,
                               max_bytes=stores.max_bytes), name="prefix-convert")
    if limits is not None:
        check_new_prefix(session=session, limits=limits, tenant_id=tenant_id, name=name,
                         new_bytes=len(converted.native))
    prefix, row = publish_version(
        session=session, blobs=stores.blobs, tenant_id=tenant_id, name=name, native=converted.native,
        values={"num_virtual_tokens": converted.num_virtual_tokens, "source_format": converted.source_format,
                "kind": converted.kind, "base_model_fingerprint": spec.fingerprint,
                "recorded_base_model": converted.recorded_base_model},
    )
    log.info("tenant %s stored prefix %s version %d (%s, %s, %s)", tenant_id, name, row.version,
             converted.source_format, converted.kind, row.sha256[:12])
    return PrefixUploaded(
        id=prefix.id, name=name, version=row.version, num_virtual_tokens=row.num_virtual_tokens,
        base_model=spec.model_id, sha256=row.sha256, size_bytes=row.size_bytes, source_format=row.source_format,
        kind=converted.kind, created_at=row.created_at, warnings=converted.warnings,
    )


def _find(session: Session, tenant_id: str, name: str) -> Prefix | None:
    return find_prefix(session, tenant_id, name)


def _version_info(v: PrefixVersion) -> PrefixVersionInfo:
    return PrefixVersionInfo(
        version=v.version, sha256=v.sha256, size_bytes=v.size_bytes, num_virtual_tokens=v.num_virtual_tokens,
        source_format=v.source_format, kind=prefix_kind(v.kind), base_model_fingerprint=v.base_model_fingerprint,
        recorded_base_model=v.recorded_base_model, created_at=v.created_at,
    )


def prefix_kind(value: str) -> PrefixKind:
    """A row's kind column (checked by the database) as its literal type."""
    return next((k for k in PREFIX_KINDS if k == value), "prefix_tuning")


def _info(p: Prefix, latest: PrefixVersion, versions: list[PrefixVersion] | None = None) -> PrefixInfo:
    return PrefixInfo(
        id=p.id, name=p.name, created_at=p.created_at, latest_version=latest.version,
        num_virtual_tokens=latest.num_virtual_tokens, kind=prefix_kind(latest.kind), sha256=latest.sha256,
        versions=None if versions is None else [_version_info(v) for v in versions],
    )


def list_prefixes(*, session: Session, tenant_id: str) -> list[PrefixInfo]:
    """The tenant's prefixes (not end users' personal ones) by name, each with its newest version."""
    latest = (
        sa.select(PrefixVersion.prefix_id, sa.func.max(PrefixVersion.version).label("v"))
        .group_by(PrefixVersion.prefix_id).subquery()
    )
    rows = session.execute(
        sa.select(Prefix, PrefixVersion)
        .join(latest, latest.c.prefix_id == Prefix.id)
        .join(PrefixVersion,
              sa.and_(PrefixVersion.prefix_id == Prefix.id, PrefixVersion.version == latest.c.v))
        .where(Prefix.tenant_id == tenant_id, Prefix.end_user_id.is_(None))
        .order_by(Prefix.name)
    ).all()
    return [_info(p, v) for p, v in rows]


def _resolve(session: Session, tenant_id: str, ref: str) -> tuple[Prefix, list[PrefixVersion], int | None]:
    """(prefix, the versions `ref` names (all, or the one), version) or NotFound."""
    name, version = parse_ref(ref)
    prefix = _find(session, tenant_id, name)
    if prefix is None or not prefix.versions:
        raise _missing(name, None)
    versions = [v for v in prefix.versions if version is None or v.version == version]
    if not versions:
        raise _missing(name, version)
    return prefix, versions, version


def get_prefix(*, session: Session, tenant_id: str, ref: str) -> PrefixInfo:
    """One prefix with its versions (oldest first); `name@v` lists only that version."""
    prefix, versions, _ = _resolve(session, tenant_id, ref)
    return _info(prefix, prefix.versions[-1], versions)


def delete_prefix(*, session: Session, stores: PrefixStores, tenant_id: str, ref: str) -> PrefixDeleted:
    """Delete every version (`name`) or one (`name@v`; the prefix goes with its last version)."""
    prefix, versions, version = _resolve(session, tenant_id, ref)
    prefix_id, name = prefix.id, prefix.name
    shas = {v.sha256 for v in versions}
    if version is None or len(prefix.versions) == 1:
        session.execute(sa.delete(Prefix).where(Prefix.id == prefix_id))  # versions cascade
    else:
        session.execute(sa.delete(PrefixVersion).where(PrefixVersion.id == versions[0].id))
    session.commit()
    log.info("tenant %s deleted prefix %s%s", tenant_id, name, "" if version is None else f"@{version}")
    delete_unreferenced_blobs(session=session, stores=stores, shas=shas)
    stores.invalidate(tenant_id, prefix_id)
    return PrefixDeleted(id=prefix_id, name=name, version=version)


def download_prefix(
    *, session: Session, stores: PrefixStores, tenant_id: str, ref: str, fmt: DownloadFormat
) -> Download:
    """The stored native bytes, or (peft) a zip of a PEFT adapter directory that `PeftModel.from_pretrained`
    loads (the files at the zip's root)."""
    prefix, versions, _ = _resolve(session, tenant_id, ref)
    row = versions[-1]
    base = f"{prefix.name}-v{row.version}"
    try:
        data = stores.blobs.get(row.sha256)
    except (BlobNotFound, BlobStoreUnavailable) as exc:
        log.error("cannot read blob %s of prefix %s: %r", row.sha256, prefix.id, exc)
        raise Unavailable("the stored prefix cannot be read right now; retry shortly") from None
    if fmt == "native":
        return Download(f"{base}.safetensors", "application/octet-stream", data)
    zipped = run_in_own_thread(lambda: _to_peft_zip(data, stores, row.recorded_base_model), name="prefix-convert")
    return Download(f"{base}.zip", "application/zip", zipped)


def _to_peft_zip(data: bytes, stores: PrefixStores, recorded: str | None) -> bytes:
    """A KV prefix as a PEFT PREFIX_TUNING adapter, a soft prompt as PROMPT_TUNING (P_TUNING if imported so)."""
    # torch: the codecs import it, and the web side stays torch-free at import (only a PEFT download converts)
    from prefix_store.codec import decode_stored
    from prefix_store.peft_codec import encode_peft_zip  # the same reason
    from prefix_store.peft_soft import encode_peft_soft_zip  # the same reason
    from prefix_store.types import PrefixError, SoftPrompt  # the same reason

    spec = require_model(stores)
    try:
        kv = decode_stored(data, spec=spec, max_virtual_tokens=stores.max_virtual_tokens,
                           max_bytes=max(stores.max_bytes, len(data)))
        name = recorded or spec.model_id
        if isinstance(kv, SoftPrompt):
            return encode_peft_soft_zip(kv, spec=spec, base_model_name_or_path=name)
        return encode_peft_zip(kv, spec=spec, base_model_name_or_path=name)
    except PrefixError as exc:
        raise Conflict(f"the stored prefix does not fit the served model: {exc}",
                       code="model_mismatch") from None
