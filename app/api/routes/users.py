"""Per-user personalization (`manage` scope): an end user's examples, their personal prefix (served as
`model: "user:<user_id>"`), personalization jobs, and erasing the user."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api.deps import LimitsDep, ManageDep, PageLimit, RuntimeDep, SessionDep
from app.protocol.fine_tuning import FineTuningJob
from app.protocol.users import (
    EndUserDeleted,
    EndUserInfo,
    EndUserList,
    ExamplesAdded,
    ExamplesCreate,
    PersonalizeRequest,
)
from app.services import fine_tuning, users

router = APIRouter(prefix="/v1/users", tags=["users"])


@router.post("/{user_id}/examples", status_code=201)
def add_examples(user_id: str, body: ExamplesCreate, principal: ManageDep, session: SessionDep, runtime: RuntimeDep,
                 tenant_limits: LimitsDep) -> ExamplesAdded:
    """Append examples (the training-file record forms) to the user's; the first post creates the user."""
    assert principal.tenant_id is not None  # ManageDep refuses the admin key
    ctx = runtime.training_context() if runtime.model is not None else None
    return users.add_examples(session=session, ctx=ctx, tenant_id=principal.tenant_id, user_id=user_id,
                              examples=body.examples, limits=tenant_limits)


@router.get("")
def list_users(principal: ManageDep, session: SessionDep, limit: PageLimit = 20,
               after: str | None = None) -> EndUserList:
    """The tenant's end users, newest first, each as `GET /v1/users/{user_id}` shows it (cursor pagination:
    `after` the last id of the previous page, `limit`)."""
    assert principal.tenant_id is not None
    return users.list_users(session=session, tenant_id=principal.tenant_id, limit=limit, after=after)


@router.get("/{user_id}")
def get_user(user_id: str, principal: ManageDep, session: SessionDep) -> EndUserInfo:
    """Example count, personal prefix version, last personalization job."""
    assert principal.tenant_id is not None
    return users.get_user(session=session, tenant_id=principal.tenant_id, user_id=user_id)


@router.post("/{user_id}/personalize")
async def personalize(user_id: str, principal: ManageDep, session: SessionDep, runtime: RuntimeDep,
                      tenant_limits: LimitsDep, body: PersonalizeRequest | None = None) -> FineTuningJob:
    """Queue a job training the next version of the user's personal prefix on their examples (warm-started
    from their current one unless `warm_start` says otherwise). Follow it under /v1/fine_tuning/jobs/{id}."""
    assert principal.tenant_id is not None
    job = await run_in_threadpool(
        users.personalize, session=session, ctx=runtime.training_context(), tenant_id=principal.tenant_id,
        user_id=user_id, req=body or PersonalizeRequest(), limits=tenant_limits)
    await fine_tuning.enqueue_job(queue=runtime.job_queue, job=job)
    return job


@router.delete("/{user_id}")
def delete_user(user_id: str, principal: ManageDep, session: SessionDep, runtime: RuntimeDep) -> EndUserDeleted:
    """Erase the user's examples, personal prefix (every version, blobs, cache copies) and checkpoints, and
    cancel their unfinished jobs."""
    assert principal.tenant_id is not None
    return users.delete_user(session=session, stores=runtime.prefix_stores(), tenant_id=principal.tenant_id,
                             user_id=user_id)
