"""Fine-tuning jobs (OpenAI's `/v1/fine_tuning/jobs`): create, list, get, cancel. Keyword-only, tenant-scoped.

Creating a job checks everything (see app/services/training_setup.py), then hands the job id to the job queue;
training never runs on the request path. The row is the job's truth: the worker moves it to running and to
succeeded / failed / cancelled, and a cancel here either ends a queued job at once or asks the worker to stop.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.db.models import EndUser, File, JobEvent, PrefixVersion, TrainingJob, utcnow
from app.errors import Conflict, InvalidRequest, NotFound, ServiceError, Unavailable
from app.jobs.data import parse_jsonl_numbered
from app.jobs.job_config import OPTION_FIELDS, WARM_START_KEY, config_from_job, on_top_of_label
from app.jobs.lease import updated
from app.jobs.queue import QueueUnavailable
from app.jobs.types import TrainConfig, TrainingDataError
from app.protocol.fine_tuning import FineTuningJob, FineTuningJobCreate, FineTuningJobList, JobError
from app.services.limits import Limits, check_new_job
from app.services.object_ids import is_id
from app.services.pagination import after_cursor, cursor_after, fetch_page
from app.services.prefixes import validate_name
from app.services.stacks import model_not_found
from app.services.training_base import behind_base, check_stack_room, resolve_base
from app.services.training_setup import (
    TrainingContext,
    build_config,
    check_examples,
    check_name_free,
    create_job_row,
    finish_validation,
    resolve_warm_start,
)
from prefix_store.blobs import BlobNotFound, BlobStoreUnavailable

if TYPE_CHECKING:
    from app.jobs.queue import JobQueue

log = logging.getLogger(__name__)

CANCELLABLE_AT_ONCE = ("validating_files", "queued")


def _suffix(suffix: str | None) -> str:
    if suffix is None:
        return f"ft-{secrets.token_hex(4)}"
    try:
        return validate_name(suffix)
    except InvalidRequest as exc:
        raise InvalidRequest(f"suffix: {exc.message}", param="suffix", code=exc.code) from None


def _training_file(session: Session, *, tenant_id: str, file_id: str, param: str) -> File:
    row = None if not is_id("file", file_id) else session.execute(
        sa.select(File).where(File.id == file_id, File.tenant_id == tenant_id)).scalar()
    if row is None:  # another tenant's file reads exactly like a missing one
        raise InvalidRequest(f"{param}: no file {file_id[:100]!r}", param=param, code="file_not_found")
    if row.purpose != "fine-tune":
        raise InvalidRequest(f"{param}: file {row.id} has purpose {row.purpose!r}, not 'fine-tune'", param=param,
                             code="invalid_file_purpose")
    return row


def _check_file(ctx: TrainingContext, row: File, config: TrainConfig, param: str) -> tuple[int, int]:
    """(examples, tokens) of a stored file, checked as the worker will read it; 400 naming the line."""
    try:
        data = ctx.blobs.get(row.sha256)
    except (BlobNotFound, BlobStoreUnavailable) as exc:
        log.error("cannot read blob %s of file %s: %r", row.sha256, row.id, exc)
        raise Unavailable(f"file {row.id} cannot be read right now; retry shortly",
                          headers={"Retry-After": "5"}) from None
    describe = f"{param} {row.id}"
    try:
        records = parse_jsonl_numbered(data, max_examples=ctx.max_file_examples)
    except TrainingDataError as exc:
        raise InvalidRequest(f"{describe}, {exc}", param=param, code="invalid_training_data") from None
    tokens = check_examples(records, ctx, config, describe=lambda exc: f"{describe}, {exc}", param=param)
    return len(records), tokens


def create_job(
    *, session: Session, ctx: TrainingContext, tenant_id: str, req: FineTuningJobCreate,
    limits: Limits | None = None,
) -> FineTuningJob:
    """Validate the request and its files, and store the job as `queued` (the caller then enqueues it)."""
    if req.model != ctx.base_model_id:
        raise model_not_found(req.model)
    name = _suffix(req.suffix)
    warm = resolve_warm_start(session, ctx, tenant_id=tenant_id, ref=req.warm_start) if req.warm_start else None
    base = resolve_base(session, ctx, tenant_id=tenant_id, ref=req.on_top_of) if req.on_top_of else None
    room = behind_base(ctx, base)  # the examples and the new prefix fit behind the base
    train = _training_file(session, tenant_id=tenant_id, file_id=req.training_file, param="training_file")
    config, display = build_config(req, req.effective_hyperparameters, ctx=room, warm=warm,
                                   n_examples=train.line_count,
                                   base_virtual_tokens=base.num_virtual_tokens if base else 0)
    check_stack_room(ctx, base, config)
    if req.validation_file is not None and config.validation_split > 0:
        raise InvalidRequest("give validation_file or validation_split, not both", param="validation_split")
    val = None if req.validation_file is None else _training_file(
        session, tenant_id=tenant_id, file_id=req.validation_file, param="validation_file")
    check_name_free(session, tenant_id=tenant_id, name=name)
    if limits is not None:
        check_new_job(session=session, limits=limits, tenant_id=tenant_id)
    job = create_job_row(
        session, TrainingJob(tenant_id=tenant_id, model=ctx.base_model_id, training_file_id=train.id,
                             validation_file_id=val.id if val else None, prefix_name=name),
        config, warm=warm, display=display,
        extra_options={**({"metadata": req.metadata} if req.metadata else {}), **(base.options() if base else {})})

    def validate() -> str:
        n, tokens = _check_file(room, train, config, "training_file")
        summary = f"Validated {n} training examples ({tokens} tokens)"
        if base is not None:
            summary += f" on top of {base.label}"
        if val is not None:
            n_val, _ = _check_file(room, val, config, "validation_file")
            summary += f" and {n_val} validation examples"
        return summary

    return job_object(session, finish_validation(session, job, validate))


async def enqueue_job(*, queue: JobQueue | None, job: FineTuningJob) -> None:
    """Hand a queued job to the workers. If the queue is down (or this process has none) the job stays
    `queued`, where the workers' recovery sweep finds it: the client's request still succeeds."""
    if job.status != "queued":
        return
    if queue is None:
        log.info("no job queue in this process: job %s waits for a worker's sweep", job.id)
        return
    try:
        await queue.enqueue(job.id)
    except QueueUnavailable as exc:
        log.warning("could not enqueue job %s (it stays queued for the recovery sweep): %s", job.id, exc)


def _with_facts() -> sa.Select[TrainingJob, int, str]:
    """Jobs with what their OpenAI object shows besides the row: the published version, the end user."""
    return (sa.select(TrainingJob, PrefixVersion.version, EndUser.external_id)
            .outerjoin(PrefixVersion, PrefixVersion.id == TrainingJob.result_prefix_version_id)
            .outerjoin(EndUser, EndUser.id == TrainingJob.end_user_id))


def job_row(session: Session, *, tenant_id: str, job_id: str) -> TrainingJob:
    """The tenant's job, or the 404 a missing one (or another tenant's) gets."""
    row = None if not is_id("training_job", job_id) else session.execute(
        sa.select(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.tenant_id == tenant_id)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"no fine-tuning job {job_id[:100]!r}", param="fine_tuning_job_id")
    return row


def job_object(session: Session, job: TrainingJob) -> FineTuningJob:
    job_, version, user = session.execute(_with_facts().where(TrainingJob.id == job.id)).one()
    return _to_object(job_, version, user)


def job_objects(session: Session, job_ids: list[str]) -> dict[str, FineTuningJob]:
    """The OpenAI objects of several jobs at once, by id (one query)."""
    if not job_ids:
        return {}
    rows = session.execute(_with_facts().where(TrainingJob.id.in_(job_ids))).all()
    return {job.id: _to_object(job, version, user) for job, version, user in rows}


def _to_object(job: TrainingJob, version: int | None, user: str | None) -> FineTuningJob:
    config = config_from_job(job)
    shown = {
        "n_epochs": config.n_epochs if config.n_epochs is not None else "auto",
        "batch_size": config.batch_size,
        "learning_rate_multiplier": job.hyperparameters.get("learning_rate_multiplier")
        or config.learning_rate / TrainConfig().learning_rate,
        **{k: v for k, v in job.hyperparameters.items() if k not in ("n_epochs", "batch_size")
           and k != "learning_rate_multiplier"},
    }
    error = job.error
    return FineTuningJob(
        id=job.id, created_at=int(job.created_at.timestamp()),
        error=JobError(code=str(error.get("code", "error")), message=str(error.get("message", "")),
                       param=error.get("param")) if error else None,
        fine_tuned_model=f"{job.prefix_name}@{version}" if version is not None else None,
        finished_at=int(job.finished_at.timestamp()) if job.finished_at else None,
        hyperparameters=shown, model=job.model, organization_id=job.tenant_id, seed=config.seed,
        status=job.status,  # type: ignore[arg-type]  # the CHECK constraint keeps it one of JobStatus
        trained_tokens=job.trained_tokens, training_file=job.training_file_id,
        validation_file=job.validation_file_id, metadata=job.options.get("metadata"),
        method={"type": "supervised", "supervised": {"hyperparameters": shown}},
        suffix=job.prefix_name, user=user,
        prefix_options={k: v for k, v in job.options.items() if k in OPTION_FIELDS - {"seed"} or k == WARM_START_KEY},
        on_top_of=on_top_of_label(job),
    )


def list_jobs(*, session: Session, tenant_id: str, limit: int, after: str | None = None) -> FineTuningJobList:
    """The tenant's jobs (personalization jobs included), newest first."""
    cursor = cursor_after(after, lambda i: job_row(session, tenant_id=tenant_id, job_id=i))
    stmt = after_cursor(_with_facts().where(TrainingJob.tenant_id == tenant_id), TrainingJob.created_at,
                        TrainingJob.id, cursor, descending=True)
    rows, more = fetch_page(session, stmt, limit)
    return FineTuningJobList(data=[_to_object(r[0], r[1], r[2]) for r in rows], has_more=more)


def get_job(*, session: Session, tenant_id: str, job_id: str) -> FineTuningJob:
    return job_object(session, job_row(session, tenant_id=tenant_id, job_id=job_id))


def request_cancel(session: Session, job_id: str) -> bool:
    """In the caller's transaction: a queued (or still validating) job becomes `cancelled` at once; a running
    one gets `cancel_requested` (its worker stops at the next step and marks it cancelled). False when the job
    had already finished."""
    if updated(session, sa.update(TrainingJob)
               .where(TrainingJob.id == job_id, TrainingJob.status.in_(CANCELLABLE_AT_ONCE))
               .values(status="cancelled", cancel_requested=True, finished_at=utcnow())):
        session.add(JobEvent(job_id=job_id, level="info", message="Job cancelled"))
        return True
    if updated(session, sa.update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.status == "running")
               .values(cancel_requested=True)):
        session.add(JobEvent(job_id=job_id, level="info", message="Cancellation requested; the job stops at its "
                                                                     "next training step"))
        return True
    return False


def cancel_job(*, session: Session, tenant_id: str, job_id: str) -> FineTuningJob:
    """Cancel a queued or running job (idempotent while it runs); 409 once it has finished."""
    job = job_row(session, tenant_id=tenant_id, job_id=job_id)
    if not request_cancel(session, job.id):
        session.rollback()
        session.refresh(job)
        raise _not_cancellable(job)
    session.commit()
    session.refresh(job)
    log.info("tenant %s cancelled job %s (%s)", tenant_id, job.id, job.status)
    return job_object(session, job)


def _not_cancellable(job: TrainingJob) -> ServiceError:
    return Conflict(f"job {job.id} has already {job.status}; only queued or running jobs can be cancelled"
                    if job.status != "cancelled" else f"job {job.id} is already cancelled",
                    param="fine_tuning_job_id", code="job_not_cancellable")
