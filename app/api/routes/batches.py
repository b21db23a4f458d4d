"""Batch API (`manage` scope), OpenAI-compatible: create, retrieve, list, cancel. The requests of a batch run in
the background at batch priority (app/batches); its results are files (`GET /v1/files/{id}/content`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from app.api.deps import LimitsDep, ManageDep, PageLimit, RuntimeDep, SessionDep
from app.protocol.batches import BatchCreate, BatchList, BatchObject
from app.services import batches

router = APIRouter(prefix="/v1/batches", tags=["batches"])


def _wake_runner(request: Request) -> None:
    """Let this process's batch runner (app/main.py) see a new or cancelled batch now, not at its next poll."""
    wake = getattr(request.app.state, "wake_batches", None)
    if callable(wake):
        wake()


@router.post("")
async def create_batch(body: BatchCreate, request: Request, principal: ManageDep, session: SessionDep,
                       runtime: RuntimeDep, tenant_limits: LimitsDep) -> BatchObject:
    """Check the input file (a malformed one gives a `failed` batch whose `errors` name its lines; nothing runs)
    and queue its requests."""
    assert principal.tenant_id is not None  # ManageDep refuses the admin key
    batch = await run_in_threadpool(
        batches.create_batch, session=session, blobs=runtime.blobs, tenant_id=principal.tenant_id, req=body,
        limits=tenant_limits, max_lines=runtime.settings.max_file_examples)
    _wake_runner(request)
    return batch


@router.get("")
def list_batches(principal: ManageDep, session: SessionDep, limit: PageLimit = 20,
                 after: str | None = None) -> BatchList:
    """The tenant's batches, newest first (OpenAI cursor pagination: `after`, `limit`)."""
    assert principal.tenant_id is not None
    return batches.list_batches(session=session, tenant_id=principal.tenant_id, limit=limit, after=after)


@router.get("/{batch_id}")
def get_batch(batch_id: str, principal: ManageDep, session: SessionDep) -> BatchObject:
    assert principal.tenant_id is not None
    return batches.get_batch(session=session, tenant_id=principal.tenant_id, batch_id=batch_id)


@router.post("/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request, principal: ManageDep, session: SessionDep) -> BatchObject:
    """`cancelling` until the runner holding the batch has stopped its requests, then `cancelled` (the results
    of the requests that finished are kept in its files). 409 once it is finalizing or finished."""
    assert principal.tenant_id is not None
    batch = await run_in_threadpool(batches.cancel_batch, session=session, tenant_id=principal.tenant_id,
                                    batch_id=batch_id)
    _wake_runner(request)
    return batch
