"""Per-user personalization: an application's end users, their examples, their personal prefix (served as
`model: "user:<id>"`), and erasing all of it. Keyword-only, tenant-scoped functions.

An end user is created by their first examples. Personalizing creates a training job like a fine-tuning job
(validated the same way) whose data are the user's stored examples and whose result is the next version of the
personal prefix `user:<id>`. Deleting a user cancels their unfinished jobs and erases their examples, every
version of their prefix, the checkpoints of their jobs, the blobs nothing else references, and the cache copies.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import (
    JOB_TERMINAL_STATUSES,
    EndUser,
    JobCheckpoint,
    Prefix,
    PrefixVersion,
    TrainingJob,
    UserExample,
    personal_prefix_name,
    utcnow,
)
from app.errors import InvalidRequest, NotFound
from app.jobs.data import tokenize_examples, validate_record
from app.jobs.types import TrainConfig, TrainingDataError
from app.protocol.fine_tuning import FineTuningJob
from app.protocol.users import (
    EndUserDeleted,
    EndUserInfo,
    EndUserList,
    ExamplesAdded,
    LastJob,
    PersonalizeRequest,
    PersonalPrefix,
)
from app.services.fine_tuning import job_object, job_objects, request_cancel
from app.services.limits import Limits, check_new_examples, check_new_job
from app.services.pagination import after_cursor, cursor_after, fetch_page
from app.services.prefixes import PrefixStores, delete_unreferenced_blobs, prefix_kind
from app.services.training_base import behind_base, check_stack_room, resolve_base
from app.services.training_setup import (
    TrainingContext,
    WarmStart,
    build_config,
    check_examples,
    check_name_free,
    create_job_row,
    find_warm_start,
    finish_validation,
    longest_example,
    resolve_warm_start,
)

log = logging.getLogger(__name__)

# The application's id for its user: no `/` (a path segment), no whitespace, and not ending in `@<digits>`,
# which would read as a version in `model: "user:<id>@<version>"`.
USER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+=:-]{0,127}")
VERSION_SUFFIX_RE = re.compile(r"@[0-9]+$")


def validate_user_id(user_id: str) -> str:
    if USER_ID_RE.fullmatch(user_id) is None or VERSION_SUFFIX_RE.search(user_id):
        raise InvalidRequest(
            f"invalid user id {user_id[:80]!r}: use 1-128 letters, digits and . _ @ + = : - (starting with a letter "
            "or digit, not ending in @<digits>)", param="user_id", code="invalid_user_id")
    return user_id


def _find_user(session: Session, tenant_id: str, user_id: str) -> EndUser | None:
    return session.execute(
        sa.select(EndUser).where(EndUser.tenant_id == tenant_id, EndUser.external_id == user_id)
    ).scalar_one_or_none()


def _user(session: Session, tenant_id: str, user_id: str) -> EndUser:
    """The tenant's end user, or the 404 a missing one (or another tenant's) gets."""
    user = _find_user(session, tenant_id, validate_user_id(user_id))
    if user is None:
        raise NotFound(f"no user {user_id!r}", param="user_id")
    return user


def _example_count(session: Session, end_user_id: str) -> int:
    return int(session.scalar(
        sa.select(sa.func.count()).select_from(UserExample).where(UserExample.end_user_id == end_user_id)) or 0)


def _validated(examples: list[Any], ctx: TrainingContext | None) -> list[dict[str, Any]]:
    """Each example validated (and, with the model loaded, tokenized within the context length minus a default
    prefix), so a bad one is refused now instead of failing every later personalization."""
    try:
        records = [validate_record(e, line=i) for i, e in enumerate(examples)]
        if ctx is not None:
            tokenize_examples(records, ctx.tokenizer, max_tokens=ctx.context_length - TrainConfig().num_virtual_tokens,
                              lines=range(len(records)))
    except TrainingDataError as exc:
        where = f"examples[{exc.line}]" if exc.line is not None else "examples"
        raise InvalidRequest(f"{where}: {exc.reason}", param=where, code="invalid_example") from None
    return records


def add_examples(
    *, session: Session, ctx: TrainingContext | None, tenant_id: str, user_id: str, examples: list[Any],
    limits: Limits | None = None,
) -> ExamplesAdded:
    """Append examples to the user's (creating the user on first use), within max_examples_per_user; all or
    nothing."""
    validate_user_id(user_id)
    records = _validated(examples, ctx)
    try:
        end_user_id = _append(session, tenant_id, user_id, records, limits)
    except IntegrityError:
        session.rollback()  # a concurrent first post created the user: add to theirs
        end_user_id = _append(session, tenant_id, user_id, records, limits)
    log.info("tenant %s: %d examples added for end user %s", tenant_id, len(records), end_user_id)
    return ExamplesAdded(user=user_id, added=len(records), example_count=_example_count(session, end_user_id))


def _append(session: Session, tenant_id: str, user_id: str, records: list[dict[str, Any]],
            limits: Limits | None) -> str:
    """Insert the examples (and the user if new) in one transaction; returns the end user's row id."""
    try:
        user = _find_user(session, tenant_id, user_id)
        if user is None:
            user = EndUser(tenant_id=tenant_id, external_id=user_id)
            session.add(user)
            session.flush()
        if limits is not None:
            check_new_examples(session=session, limits=limits, end_user_id=user.id, adding=len(records))
        # Distinct, increasing timestamps keep the posted order (the worker reads by created_at, id).
        start = utcnow()
        session.add_all(UserExample(end_user_id=user.id, data=r, created_at=start + timedelta(microseconds=i))
                        for i, r in enumerate(records))
        session.commit()
        return user.id
    except BaseException:
        session.rollback()
        raise


def get_user(*, session: Session, tenant_id: str, user_id: str) -> EndUserInfo:
    return _infos(session, [_user(session, tenant_id, user_id)])[0]


def list_users(*, session: Session, tenant_id: str, limit: int, after: str | None = None) -> EndUserList:
    """The tenant's end users, newest first, `limit` per page (`after`: the last user id of the previous page)."""
    def find(user_id: str) -> EndUser:
        user = _find_user(session, tenant_id, user_id)
        if user is None:
            raise NotFound(f"no user {user_id[:80]!r}")
        return user

    stmt = sa.select(EndUser).where(EndUser.tenant_id == tenant_id)
    rows, more = fetch_page(session, after_cursor(stmt, EndUser.created_at, EndUser.id, cursor_after(after, find),
                                                  descending=True), limit)
    data = _infos(session, [r.EndUser for r in rows])
    return EndUserList(data=data, has_more=more, first_id=data[0].id if data else None,
                       last_id=data[-1].id if data else None)


def _infos(session: Session, users: list[EndUser]) -> list[EndUserInfo]:
    """What GET /v1/users/{id} shows for each of `users`, in four queries whatever their number: example
    counts, each user's newest personal prefix version, each user's newest job's id, those jobs' objects."""
    ids = [u.id for u in users]
    counts: dict[str, int] = {uid: int(n) for uid, n in session.execute(
        sa.select(UserExample.end_user_id, sa.func.count()).where(UserExample.end_user_id.in_(ids))
        .group_by(UserExample.end_user_id)).all()}
    newest_version = sa.func.row_number().over(partition_by=Prefix.end_user_id,
                                               order_by=PrefixVersion.version.desc()).label("rank")
    ranked = (sa.select(PrefixVersion.id, Prefix.end_user_id, newest_version)
              .join(Prefix, Prefix.id == PrefixVersion.prefix_id).where(Prefix.end_user_id.in_(ids)).subquery())
    versions = {uid: v for v, uid in session.execute(
        sa.select(PrefixVersion, ranked.c.end_user_id).join(ranked, ranked.c.id == PrefixVersion.id)
        .where(ranked.c.rank == 1)).all()}
    newest_job = sa.func.row_number().over(
        partition_by=TrainingJob.end_user_id, order_by=(TrainingJob.created_at.desc(), TrainingJob.id.desc())
    ).label("rank")
    ranked_jobs = (sa.select(TrainingJob.id, TrainingJob.end_user_id, newest_job)
                   .where(TrainingJob.end_user_id.in_(ids)).subquery())
    last_job_ids = {uid: jid for jid, uid in session.execute(
        sa.select(ranked_jobs.c.id, ranked_jobs.c.end_user_id).where(ranked_jobs.c.rank == 1)).all()}
    jobs = job_objects(session, list(last_job_ids.values()))
    out = []
    for user in users:
        job = jobs.get(last_job_ids.get(user.id, ""))
        latest = versions.get(user.id)
        out.append(EndUserInfo(
            id=user.external_id, created_at=user.created_at, example_count=counts.get(user.id, 0),
            personal_prefix=None if latest is None else PersonalPrefix(
                model=personal_prefix_name(user.external_id), version=latest.version,
                num_virtual_tokens=latest.num_virtual_tokens, kind=prefix_kind(latest.kind),
                created_at=latest.created_at),
            last_job=None if job is None else LastJob(
                id=job.id, status=job.status, created_at=job.created_at, finished_at=job.finished_at,
                fine_tuned_model=job.fine_tuned_model)))
    return out


def _warm_start(session: Session, ctx: TrainingContext, tenant_id: str, user: EndUser, req: PersonalizeRequest
                ) -> WarmStart | None:
    if "warm_start" in req.model_fields_set:  # named (a tenant prefix) or explicitly null (from scratch)
        return resolve_warm_start(session, ctx, tenant_id=tenant_id, ref=req.warm_start) if req.warm_start else None
    return find_warm_start(session, ctx, tenant_id=tenant_id, name=personal_prefix_name(user.external_id),
                           version=None)


def personalize(
    *, session: Session, ctx: TrainingContext, tenant_id: str, user_id: str, req: PersonalizeRequest,
    limits: Limits | None = None,
) -> FineTuningJob:
    """A job that trains the next version of the user's personal prefix on their examples (queued; the caller
    enqueues it)."""
    user = _user(session, tenant_id, user_id)
    rows = session.execute(
        sa.select(UserExample.data).where(UserExample.end_user_id == user.id)
        .order_by(UserExample.created_at, UserExample.id)
    ).scalars().all()
    if not rows:
        raise InvalidRequest(f"user {user_id!r} has no examples: POST some to /v1/users/{user_id}/examples first",
                             param="user_id", code="no_examples")
    warm = _warm_start(session, ctx, tenant_id, user, req)
    base = resolve_base(session, ctx, tenant_id=tenant_id, ref=req.on_top_of) if req.on_top_of else None
    room = behind_base(ctx, base)  # the examples and the new prefix fit behind the base
    config, display = build_config(req, req.hyperparameters, ctx=room, warm=warm, n_examples=len(rows),
                                   longest_example=longest_example(rows, room),
                                   base_virtual_tokens=base.num_virtual_tokens if base else 0)
    check_stack_room(ctx, base, config)
    name = personal_prefix_name(user_id)
    check_name_free(session, tenant_id=tenant_id, name=name)
    if limits is not None:
        check_new_job(session=session, limits=limits, tenant_id=tenant_id)
    job = create_job_row(session, TrainingJob(tenant_id=tenant_id, model=ctx.base_model_id, end_user_id=user.id,
                                              prefix_name=name), config, warm=warm, display=display,
                         extra_options=base.options() if base else None)
    records = list(enumerate(rows, start=1))  # numbered as the worker numbers them: oldest first, from 1

    def validate() -> str:
        tokens = check_examples(records, room, config, param="user_id",
                                describe=lambda exc: f"user example {exc.line}: {exc.reason}")
        on_top = f" on top of {base.label}" if base is not None else ""
        return f"Validated {len(records)} examples of user {user_id} ({tokens} tokens){on_top}"

    return job_object(session, finish_validation(session, job, validate))


def delete_user(*, session: Session, stores: PrefixStores, tenant_id: str, user_id: str) -> EndUserDeleted:
    """Erase the user everywhere (see the module docstring); their jobs stay, cancelled, as the tenant's record."""
    user = _user(session, tenant_id, user_id)
    jobs = session.execute(sa.select(TrainingJob.id).where(TrainingJob.end_user_id == user.id)).scalars().all()
    active = session.execute(sa.select(TrainingJob.id).where(
        TrainingJob.end_user_id == user.id, TrainingJob.status.not_in(JOB_TERMINAL_STATUSES))).scalars().all()
    cancelled = sum(request_cancel(session, job_id) for job_id in active)
    prefixes = session.execute(sa.select(Prefix.id).where(Prefix.end_user_id == user.id)).scalars().all()
    versions = session.execute(
        sa.select(PrefixVersion.sha256).where(PrefixVersion.prefix_id.in_(prefixes))).scalars().all()
    checkpoint_shas = session.execute(
        sa.select(JobCheckpoint.sha256).where(JobCheckpoint.job_id.in_(jobs))).scalars().all()
    n_examples = _example_count(session, user.id)
    # The checkpoints were trained on the user's data: they go too. Examples and prefixes cascade with the user.
    session.execute(sa.delete(JobCheckpoint).where(JobCheckpoint.job_id.in_(jobs)))
    session.execute(sa.delete(EndUser).where(EndUser.id == user.id))
    session.commit()
    log.info("tenant %s erased end user %s (%d examples, %d prefix versions, %d jobs cancelled)", tenant_id, user.id,
             n_examples, len(versions), cancelled)
    delete_unreferenced_blobs(session=session, stores=stores, shas=[*versions, *checkpoint_shas])
    for prefix_id in prefixes:
        stores.invalidate(tenant_id, prefix_id)
    return EndUserDeleted(id=user_id, examples_deleted=n_examples, prefix_versions_deleted=len(versions),
                          jobs_cancelled=cancelled)
