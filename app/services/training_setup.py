"""Turning a training request into a validated job row: what fine-tuning jobs and personalization share.

A request is checked completely before a job can be queued (hyperparameter ranges, the warm-start prefix, the
prefix name, every example tokenized within the context length minus the prefix), so a queued job fails only
for reasons that could not be known at request time. The row goes `validating_files` → `queued`; when a check
fails the row is deleted again and the client gets a 400 naming what is wrong: nothing is left behind.
"""

from __future__ import annotations

import logging
import secrets
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.catalog.refs import find_version
from app.db.models import JOB_TERMINAL_STATUSES, JobEvent, TrainingJob
from app.errors import Conflict, InvalidRequest
from app.jobs.data import tokenize_examples
from app.jobs.data_defaults import FEW_EXAMPLES_MAX, DataDefaults, data_defaults
from app.jobs.job_config import job_columns
from app.jobs.lease import updated
from app.jobs.types import TrainConfig, TrainingDataError
from app.protocol.fine_tuning import MAX_SEED, Hyperparameters, TrainingOptions
from app.services.prefixes import parse_ref
from app.services.stacks import StackLimits

if TYPE_CHECKING:
    from prefix_store.blobs import BlobStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingContext:
    """What validating a training request needs of the running service."""

    blobs: BlobStore
    tokenizer: Any  # the served model's (Hugging Face) tokenizer
    context_length: int
    base_model_id: str
    fingerprint: str
    max_virtual_tokens: int
    max_file_examples: int
    stacking: StackLimits = field(default_factory=StackLimits)  # what `on_top_of` and the new prefix may come to


@dataclass(frozen=True)
class WarmStart:
    ref: str  # pinned: `name@version`
    num_virtual_tokens: int
    soft_prompt: bool = False  # a soft prompt (only prompt tuning starts from one) or a KV prefix


def find_warm_start(session: Session, ctx: TrainingContext, *, tenant_id: str, name: str, version: int | None,
                    param: str = "warm_start") -> WarmStart | None:
    """The prefix version `name[@version]` of the tenant (personal prefixes included), pinned; None if missing.
    A version recorded for another base model is refused (its KV would not fit the served model)."""
    found = find_version(session, tenant_id=tenant_id, name=name, version=version)
    if found is None:
        return None
    if found.base_model_fingerprint != ctx.fingerprint:
        raise InvalidRequest(f"prefix {name}@{found.version} was made for another base model and cannot be a "
                             "warm start here", param=param, code="model_mismatch")
    return WarmStart(f"{name}@{found.version}", found.num_virtual_tokens, found.soft_prompt)


def resolve_warm_start(session: Session, ctx: TrainingContext, *, tenant_id: str, ref: str) -> WarmStart:
    """A warm start the client named: one of the tenant's prefixes, `name` or `name@version`; else 400."""
    try:
        name, version = parse_ref(ref)
    except InvalidRequest as exc:
        raise InvalidRequest(f"warm_start: {exc.message}", param="warm_start", code="invalid_name") from None
    found = find_warm_start(session, ctx, tenant_id=tenant_id, name=name, version=version)
    if found is None:
        raise InvalidRequest(f"warm_start: no prefix {ref[:100]!r}", param="warm_start", code="prefix_not_found")
    return found


def build_config(opts: TrainingOptions, hp: Hyperparameters | None, *, ctx: TrainingContext,
                 warm: WarmStart | None, n_examples: int | None = None, longest_example: int | None = None,
                 base_virtual_tokens: int = 0) -> tuple[TrainConfig, dict[str, Any]]:
    """(the TrainConfig the request asks for, display-only hyperparameters). Ranges were checked by the
    protocol models; what depends on the server or on the warm start is checked here. What the request leaves
    unset takes the defaults for `n_examples` training examples (app/jobs/data_defaults.py; None: unknown);
    the default prefix length also fits the longest example (tokens) and the stack on a base of
    `base_virtual_tokens`."""
    base, hp = TrainConfig(), hp or Hyperparameters()
    kind = opts.kind or base.kind
    auto = data_defaults(n_examples, kind, on_top=base_virtual_tokens > 0)
    p = opts.num_virtual_tokens or (warm.num_virtual_tokens if warm else _default_p(auto, ctx, longest_example,
                                                                                     base_virtual_tokens))
    if p > ctx.max_virtual_tokens:
        raise InvalidRequest(f"num_virtual_tokens {p} is above this server's limit of {ctx.max_virtual_tokens}",
                             param="num_virtual_tokens")
    if warm is not None and p != warm.num_virtual_tokens:
        raise InvalidRequest(f"num_virtual_tokens {p} differs from the warm-start prefix {warm.ref} "
                             f"({warm.num_virtual_tokens})", param="num_virtual_tokens")
    if p >= ctx.context_length:
        raise InvalidRequest(f"num_virtual_tokens {p} leaves no room in the model's context of "
                             f"{ctx.context_length} tokens", param="num_virtual_tokens")
    if opts.encoder_hidden_size is not None and not opts.prefix_projection:
        raise InvalidRequest("encoder_hidden_size applies only with prefix_projection: true",
                             param="encoder_hidden_size")
    check_kind(opts, kind, warm)
    lr = hp.learning_rate or auto.learning_rate * (hp.learning_rate_multiplier or 1.0)
    # An explicit length (steps or epochs) wins over the default length; max_steps wins over n_epochs.
    steps = hp.max_steps if hp.max_steps is not None or hp.n_epochs is not None else auto.max_steps
    patience = base.early_stopping_patience if opts.early_stopping_patience is None else (
        opts.early_stopping_patience or None)  # 0: never stop early
    config = TrainConfig(
        num_virtual_tokens=p, prefix_projection=bool(opts.prefix_projection),
        encoder_hidden_size=opts.encoder_hidden_size, learning_rate=lr,
        batch_size=hp.batch_size or auto.batch_size, n_epochs=hp.n_epochs, max_steps=steps,
        warmup_ratio=base.warmup_ratio if hp.warmup_ratio is None else hp.warmup_ratio,
        weight_decay=base.weight_decay if hp.weight_decay is None else hp.weight_decay,
        seed=opts.seed if opts.seed is not None else secrets.randbelow(MAX_SEED + 1),  # recorded: reproducible
        eval_every=hp.eval_every or base.eval_every, early_stopping_patience=patience,
        checkpoint_every=hp.checkpoint_every, validation_split=opts.validation_split or 0.0,
        prefix_init=opts.prefix_init or base.prefix_init, kind=kind,
    )
    display = {"learning_rate_multiplier": hp.learning_rate_multiplier} if hp.learning_rate_multiplier else {}
    return config, display


def _default_p(auto: DataDefaults, ctx: TrainingContext, longest_example: int | None, base_tokens: int) -> int:
    """The default prefix length: shortened to the room the longest example (tokens) leaves, but not below
    TrainConfig's (the length a request got before the few-example defaults); then to the server's limit and the
    room a base of `base_tokens` leaves in a stack, which are hard limits: a default never turns a request that
    fits into a 400."""
    p = auto.num_virtual_tokens
    if longest_example is not None:
        p = max(min(p, ctx.context_length - longest_example), min(TrainConfig().num_virtual_tokens, p))
    p = min(p, ctx.max_virtual_tokens)
    if base_tokens:
        p = min(p, ctx.stacking.max_virtual_tokens - base_tokens)
    return max(1, p)


def check_kind(opts: TrainingOptions, kind: str, warm: WarmStart | None) -> None:
    """What prompt tuning does not take (a KV prefix's options, a base to train behind), and a warm start of the
    other kind: 400s naming the field."""
    if kind == "prompt_tuning":
        for field_name in ("prefix_projection", "on_top_of"):
            if getattr(opts, field_name):
                raise InvalidRequest(f"{field_name} applies only to kind prefix_tuning; a soft prompt "
                                     "(kind prompt_tuning) is trained directly and never stacks", param=field_name)
    if warm is not None and warm.soft_prompt != (kind == "prompt_tuning"):
        what = "a soft prompt" if warm.soft_prompt else "a KV prefix"
        raise InvalidRequest(f"warm_start {warm.ref} is {what}; kind {kind} starts only from a "
                             f"{'soft prompt' if kind == 'prompt_tuning' else 'KV prefix'}", param="warm_start")


def check_name_free(session: Session, *, tenant_id: str, name: str) -> None:
    """409 while another unfinished job of the tenant trains the same prefix: two jobs publishing versions of
    one name would interleave unpredictably."""
    other = session.execute(
        sa.select(TrainingJob.id).where(TrainingJob.tenant_id == tenant_id, TrainingJob.prefix_name == name,
                                        TrainingJob.status.not_in(JOB_TERMINAL_STATUSES)).limit(1)
    ).scalar_one_or_none()
    if other is not None:
        raise Conflict(f"job {other} is already training prefix {name!r}; wait for it or cancel it",
                       param="suffix", code="suffix_in_use")


def longest_example(records: Sequence[dict[str, Any]], ctx: TrainingContext) -> int | None:
    """The longest record in tokens, for the default prefix length of a few examples (app/jobs/data_defaults.py);
    None beyond FEW_EXAMPLES_MAX records (the default does not depend on it there) or when one cannot be
    tokenized (check_examples then names it)."""
    if len(records) > FEW_EXAMPLES_MAX:
        return None
    try:
        examples = tokenize_examples(records, ctx.tokenizer, max_tokens=sys.maxsize)
    except TrainingDataError:
        return None
    return max((len(e.input_ids) for e in examples), default=0)


def check_examples(records: Sequence[tuple[int, dict[str, Any]]], ctx: TrainingContext, config: TrainConfig, *,
                   describe: Callable[[TrainingDataError], str], param: str) -> int:
    """Tokenize every record as the worker will; 400 naming the record when one does not fit. Returns the
    number of tokens."""
    try:
        examples = tokenize_examples([r for _, r in records], ctx.tokenizer,
                                     max_tokens=ctx.context_length - config.num_virtual_tokens,
                                     lines=[n for n, _ in records])
    except TrainingDataError as exc:
        raise InvalidRequest(describe(exc), param=param, code="invalid_training_data") from None
    return sum(len(e.input_ids) for e in examples)


def create_job_row(session: Session, job: TrainingJob, config: TrainConfig, *, warm: WarmStart | None,
                   display: dict[str, Any], extra_options: dict[str, Any] | None = None) -> TrainingJob:
    """Insert the job in `validating_files` (committed: visible while large files are checked)."""
    hyper, options = job_columns(config, warm_start=warm.ref if warm else None, display=display)
    job.hyperparameters, job.options = hyper, {**options, **(extra_options or {})}
    job.status = "validating_files"
    session.add(job)
    session.add(JobEvent(job=job, level="info", message="Validating training data"))
    session.commit()
    return job


def finish_validation(session: Session, job: TrainingJob, validate: Callable[[], str]) -> TrainingJob:
    """Run `validate` (returns a summary for the job's events): on success the job is `queued`; on any error
    the row is deleted again and the error propagates (a 400 naming the problem)."""
    try:
        summary = validate()
    except BaseException:
        session.rollback()
        session.execute(sa.delete(TrainingJob).where(TrainingJob.id == job.id))
        session.commit()
        raise
    # Conditional: a cancel that came in while the data was being checked wins.
    moved = updated(session, sa.update(TrainingJob)
                    .where(TrainingJob.id == job.id, TrainingJob.status == "validating_files").values(status="queued"))
    if moved:
        session.add(JobEvent(job_id=job.id, level="info", message=f"{summary}; job queued"))
    session.commit()
    session.refresh(job)
    log.info("job %s for prefix %s: %s", job.id, job.prefix_name, job.status)
    return job
