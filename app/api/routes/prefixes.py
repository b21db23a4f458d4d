"""Prefix management (`manage` scope): upload versions, list, get, delete, download."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import LimitsDep, ManageDep, RuntimeDep, SessionDep
from app.protocol.prefixes import PrefixDeleted, PrefixInfo, PrefixList, PrefixUploaded
from app.services import prefixes
from app.services.uploads import check_content_length, read_prefix_form

router = APIRouter(prefix="/v1/prefixes", tags=["prefixes"])

_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "file": {"type": "string", "format": "binary",
                         "description": "a native .safetensors prefix or a zip of a PEFT adapter directory"},
                "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                          "description": "adapter_config.json and adapter_model.safetensors"},
            },
        }}},
    }
}


@router.post("", status_code=201, openapi_extra=_UPLOAD_DOC)
async def upload_prefix(
    request: Request, principal: ManageDep, session: SessionDep, runtime: RuntimeDep, tenant_limits: LimitsDep
) -> PrefixUploaded:
    """Upload a prefix (native or HF PEFT); an existing name gets a new version."""
    stores = runtime.prefix_stores()
    prefixes.require_model(stores)
    limit = runtime.settings.max_upload_bytes
    check_content_length(request.headers.get("content-length"), limit)
    name, files = await read_prefix_form(request, limit=limit)
    assert principal.tenant_id is not None  # ManageDep refuses the admin key
    return await run_in_threadpool(
        prefixes.upload_prefix, session=session, stores=stores, tenant_id=principal.tenant_id, name=name,
        files=files, limits=tenant_limits,
    )


@router.get("")
def list_prefixes(principal: ManageDep, session: SessionDep) -> PrefixList:
    """The tenant's prefixes with their newest version."""
    assert principal.tenant_id is not None
    return PrefixList(data=prefixes.list_prefixes(session=session, tenant_id=principal.tenant_id))


@router.get("/{ref}")
def get_prefix(ref: str, principal: ManageDep, session: SessionDep) -> PrefixInfo:
    """A prefix with its versions (`name@v`: that version only)."""
    assert principal.tenant_id is not None
    return prefixes.get_prefix(session=session, tenant_id=principal.tenant_id, ref=ref)


@router.delete("/{ref}")
def delete_prefix(ref: str, principal: ManageDep, session: SessionDep, runtime: RuntimeDep) -> PrefixDeleted:
    """Delete every version (`name`) or one version (`name@v`); it is never served again."""
    assert principal.tenant_id is not None
    return prefixes.delete_prefix(session=session, stores=runtime.prefix_stores(),
                                  tenant_id=principal.tenant_id, ref=ref)


@router.get("/{ref}/download")
def download_prefix(
    ref: str, principal: ManageDep, session: SessionDep, runtime: RuntimeDep,
    fmt: Annotated[prefixes.DownloadFormat, Query(alias="format")] = "native",
) -> Response:
    """The newest (or `@v`) version: `native` safetensors as stored, or `peft` as an adapter-directory zip."""
    assert principal.tenant_id is not None
    out = prefixes.download_prefix(session=session, stores=runtime.prefix_stores(),
                                   tenant_id=principal.tenant_id, ref=ref, fmt=fmt)
    return Response(out.data, media_type=out.media_type,
                    headers={"Content-Disposition": f'attachment; filename="{out.filename}"'})
