"""Fine-tuning jobs (`manage` scope), OpenAI-compatible: create, list, get, cancel, events (also as SSE),
checkpoints. A job trains a prefix named by `suffix` on the served base model; training runs on workers."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import LimitsDep, ManageDep, PageLimit, RuntimeDep, SessionDep
from app.api.routes.streaming import respond
from app.protocol.fine_tuning import (
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobCreate,
    FineTuningJobEventList,
    FineTuningJobList,
)
from app.services import fine_tuning, job_events

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])



@router.post("")
async def create_job(body: FineTuningJobCreate, principal: ManageDep, session: SessionDep, runtime: RuntimeDep,
                     tenant_limits: LimitsDep) -> FineTuningJob:
    """Validate the request and its files (a 400 names the bad field or line) and queue the job."""
    assert principal.tenant_id is not None  # ManageDep refuses the admin key
    job = await run_in_threadpool(
        fine_tuning.create_job, session=session, ctx=runtime.training_context(), tenant_id=principal.tenant_id,
        req=body, limits=tenant_limits)
    await fine_tuning.enqueue_job(queue=runtime.job_queue, job=job)
    return job


@router.get("")
def list_jobs(principal: ManageDep, session: SessionDep, limit: PageLimit = 20, after: str | None = None
              ) -> FineTuningJobList:
    """The tenant's jobs, newest first (personalization jobs included)."""
    assert principal.tenant_id is not None
    return fine_tuning.list_jobs(session=session, tenant_id=principal.tenant_id, limit=limit, after=after)


@router.get("/{job_id}")
def get_job(job_id: str, principal: ManageDep, session: SessionDep) -> FineTuningJob:
    assert principal.tenant_id is not None
    return fine_tuning.get_job(session=session, tenant_id=principal.tenant_id, job_id=job_id)


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, principal: ManageDep, session: SessionDep) -> FineTuningJob:
    """A queued job is cancelled at once; a running one stops at its next step (status stays `running` until
    then). 409 once the job has finished."""
    assert principal.tenant_id is not None
    return fine_tuning.cancel_job(session=session, tenant_id=principal.tenant_id, job_id=job_id)


@router.get("/{job_id}/events", response_model=None,
            responses={200: {"model": FineTuningJobEventList,
                             "description": "the events, or with `stream=true` an SSE stream of them"}})
async def list_events(job_id: str, principal: ManageDep, session: SessionDep, runtime: RuntimeDep,
                      limit: PageLimit = 20, after: str | None = None, stream: bool = False
                      ) -> Response | EventSourceResponse:
    """Newest first; `stream=true`: every event oldest first as Server-Sent Events, live, until the job ends."""
    assert principal.tenant_id is not None
    if stream:
        events = await run_in_threadpool(job_events.open_event_stream, session=session, sessions=runtime.sessions,
                                         tenant_id=principal.tenant_id, job_id=job_id, after=after)
        return respond(events)
    page = await run_in_threadpool(job_events.list_events, session=session, tenant_id=principal.tenant_id,
                                   job_id=job_id, limit=limit, after=after)
    return respond(page)


@router.get("/{job_id}/checkpoints")
def list_checkpoints(job_id: str, principal: ManageDep, session: SessionDep, limit: PageLimit = 10,
                     after: str | None = None) -> FineTuningJobCheckpointList:
    """Prefixes saved during training, latest step first."""
    assert principal.tenant_id is not None
    return job_events.list_checkpoints(session=session, tenant_id=principal.tenant_id, job_id=job_id, limit=limit,
                                       after=after)
