"""Files API (`manage` scope), OpenAI-compatible: upload JSONL training files, list, get, content, delete."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import LimitsDep, ManageDep, RuntimeDep, SessionDep
from app.protocol.files import FileDeleted, FileList, FileObject
from app.services import files
from app.services.uploads import check_content_length

router = APIRouter(prefix="/v1/files", tags=["files"])

_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file", "purpose"],
            "properties": {
                "file": {"type": "string", "format": "binary",
                         "description": "JSONL. fine-tune: one {prompt, completion} or {messages} example per "
                                        "line; batch: one {custom_id, method, url, body} request per line"},
                "purpose": {"type": "string", "enum": ["fine-tune", "batch"]},
            },
        }}},
    }
}


@router.post("", openapi_extra=_UPLOAD_DOC)
async def upload_file(request: Request, principal: ManageDep, session: SessionDep, runtime: RuntimeDep,
                      tenant_limits: LimitsDep) -> FileObject:
    """Upload a training file (every line is validated: a 400 names the first bad line, nothing is stored on
    error) or a Batch API input file (its lines are checked when a batch is created from it)."""
    assert principal.tenant_id is not None  # ManageDep refuses the admin key
    limit = runtime.settings.max_file_bytes
    check_content_length(request.headers.get("content-length"), limit)
    upload = await files.read_file_form(request, limit=limit)
    return await run_in_threadpool(
        files.create_file, session=session, stores=runtime.prefix_stores(), tenant_id=principal.tenant_id,
        upload=upload, max_examples=runtime.settings.max_file_examples, limits=tenant_limits)


@router.get("")
def list_files(
    principal: ManageDep, session: SessionDep, purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    """The tenant's files, newest first (OpenAI cursor pagination: `after`, `limit`)."""
    assert principal.tenant_id is not None
    return files.list_files(session=session, tenant_id=principal.tenant_id, purpose=purpose, limit=limit,
                            after=after, order=order)


@router.get("/{file_id}")
def get_file(file_id: str, principal: ManageDep, session: SessionDep) -> FileObject:
    assert principal.tenant_id is not None
    return files.get_file(session=session, tenant_id=principal.tenant_id, file_id=file_id)


@router.get("/{file_id}/content", response_class=Response)
def file_content(file_id: str, principal: ManageDep, session: SessionDep, runtime: RuntimeDep) -> Response:
    """The file's bytes, as uploaded."""
    assert principal.tenant_id is not None
    filename, data = files.file_content(session=session, stores=runtime.prefix_stores(),
                                        tenant_id=principal.tenant_id, file_id=file_id)
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{_quoted(filename)}"'})


def _quoted(filename: str) -> str:
    # The header is latin-1 and `"` ends the quoted string: keep a safe ASCII rendering of the name.
    return "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)


@router.delete("/{file_id}")
def delete_file(file_id: str, principal: ManageDep, session: SessionDep, runtime: RuntimeDep) -> FileDeleted:
    """Delete a file (409 while a queued or running job still needs it)."""
    assert principal.tenant_id is not None
    return files.delete_file(session=session, stores=runtime.prefix_stores(), tenant_id=principal.tenant_id,
                             file_id=file_id)
