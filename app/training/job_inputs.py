"""What a training job trains on: its examples (files or an end user's stored examples) and its warm start.

Every problem is raised as `JobFailed` with the error the job will carry: bad data names the file (or user
example) and the line, a missing warm-start prefix or base (`on_top_of`) names the reference.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.catalog.refs import DbCatalog, InvalidRef, split_ref
from app.db.models import File, JobCheckpoint, TrainingJob, UserExample
from app.jobs.data import parse_jsonl_numbered, tokenize_examples
from app.jobs.job_config import bases_of, warm_start_of
from app.jobs.lease import JobError
from app.jobs.types import TokenizedExample, TrainingDataError
from prefix_store.blobs import BlobNotFound, BlobStore, BlobStoreUnavailable

if TYPE_CHECKING:
    from app.engine.model import LoadedModel
    from app.training.train_state import TrainState
    from prefix_store.types import PrefixKV, PrefixTensors

log = logging.getLogger(__name__)

# The API validated the file at upload time with its own limits; this bound only keeps a worker's memory sane.
MAX_FILE_EXAMPLES = 1_000_000


class JobFailed(Exception):
    """The job cannot succeed; `error` says why (stored on the job and in its events)."""

    def __init__(self, error: JobError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True)
class JobData:
    train: list[TokenizedExample]
    val: list[TokenizedExample]


def load_job_data(job: TrainingJob, *, sessions: sessionmaker[Session], blobs: BlobStore, loaded: LoadedModel,
                  max_tokens: int) -> JobData:
    """The job's tokenized examples. max_tokens: the longest sequence (context length − virtual tokens)."""
    if job.end_user_id is not None:
        records = _user_records(sessions, job.end_user_id)
        return JobData(_tokenize(records, loaded, max_tokens, what="user example", param=None), [])
    if job.training_file_id is None:
        raise JobFailed(JobError("training_file_missing", "the training file was deleted", "training_file"))
    train = _file_examples(job, job.training_file_id, "training file", "training_file", sessions, blobs, loaded,
                           max_tokens)
    val: list[TokenizedExample] = []
    if job.validation_file_id is not None:
        val = _file_examples(job, job.validation_file_id, "validation file", "validation_file", sessions, blobs,
                             loaded, max_tokens)
    return JobData(train, val)


def _user_records(sessions: sessionmaker[Session], end_user_id: str) -> list[tuple[int, dict[str, Any]]]:
    with sessions() as session:
        rows = session.execute(
            sa.select(UserExample.data).where(UserExample.end_user_id == end_user_id)
            .order_by(UserExample.created_at, UserExample.id)
        ).scalars().all()
    if not rows:
        raise JobFailed(JobError("no_examples", "the end user has no examples to train on"))
    return [(i, data) for i, data in enumerate(rows, start=1)]


def _file_examples(job: TrainingJob, file_id: str, what: str, param: str, sessions: sessionmaker[Session],
                   blobs: BlobStore, loaded: LoadedModel, max_tokens: int) -> list[TokenizedExample]:
    with sessions() as session:
        row = session.get(File, file_id)
    if row is None or row.tenant_id != job.tenant_id:
        raise JobFailed(JobError(f"{param}_missing", f"the {what} {file_id} was deleted", param))
    try:
        data = blobs.get(row.sha256)
    except (BlobNotFound, BlobStoreUnavailable) as exc:
        log.error("job %s: cannot read the %s %s (blob %s): %r", job.id, what, file_id, row.sha256, exc)
        raise JobFailed(JobError("storage_unavailable", f"the {what} {file_id} cannot be read right now",
                                 param)) from None
    try:
        records = parse_jsonl_numbered(data, max_examples=MAX_FILE_EXAMPLES)
    except TrainingDataError as exc:
        raise _data_error(exc, f"{what} {file_id}", param) from None
    return _tokenize(records, loaded, max_tokens, what=f"{what} {file_id}", param=param)


def _tokenize(records: Sequence[tuple[int, dict[str, Any]]], loaded: LoadedModel, max_tokens: int, *, what: str,
              param: str | None) -> list[TokenizedExample]:
    try:
        return tokenize_examples([r for _, r in records], loaded.tokenizer, max_tokens=max_tokens,
                                 lines=[n for n, _ in records])
    except TrainingDataError as exc:
        raise _data_error(exc, what, param) from None


def _data_error(exc: TrainingDataError, what: str, param: str | None) -> JobFailed:
    """`training file file-x, line 3: ...` for a file; `user example 3: ...` for an end user's examples."""
    if exc.line is None:
        return JobFailed(JobError("invalid_training_data", f"{what}: {exc.reason}", param))
    where = f"{what}, line {exc.line}" if param else f"{what} {exc.line}"
    return JobFailed(JobError("invalid_training_data", f"{where}: {exc.reason}", param))


def _read_prefix(job: TrainingJob, sha256: str, *, label: str, what: str, param: str, invalid: str,
                 blobs: BlobStore, loaded: LoadedModel, max_virtual_tokens: int, max_bytes: int) -> PrefixTensors:
    """A stored prefix version the job needs (`what` `label`, e.g. the warm-start prefix `poet@2`), decoded for
    the model; a blob that cannot be read now, or does not fit the model, fails the job naming `param`."""
    # torch: prefix_store's codec imports it, and app/training's job modules stay torch-free at import
    from prefix_store.codec import decode_stored
    from prefix_store.types import PrefixError  # the same reason

    try:
        return decode_stored(blobs.get(sha256), spec=loaded.spec, max_virtual_tokens=max_virtual_tokens,
                             max_bytes=max_bytes)
    except (BlobNotFound, BlobStoreUnavailable) as exc:
        log.error("job %s: cannot read the %s blob %s: %r", job.id, what, sha256, exc)
        raise JobFailed(JobError("storage_unavailable", f"the {what} {label!r} cannot be read right now",
                                 param)) from None
    except PrefixError as exc:
        raise JobFailed(JobError(invalid, f"the {what} {label!r} does not fit the model: {exc}", param)) from None


def load_warm_start(job: TrainingJob, *, sessions: sessionmaker[Session], blobs: BlobStore, loaded: LoadedModel,
                    max_virtual_tokens: int, max_bytes: int) -> PrefixTensors | None:
    """The prefix the job starts from (`options.warm_start`, a `name@version` reference), or None."""
    ref = warm_start_of(job)
    if ref is None:
        return None
    try:
        name, version = split_ref(ref)  # checked when the job was created; the same parser reads it back
    except InvalidRef as exc:
        raise JobFailed(JobError("invalid_warm_start", str(exc), "warm_start")) from None
    found = DbCatalog(sessions).lookup(job.tenant_id, name, version)
    if found is None:
        raise JobFailed(JobError("warm_start_not_found", f"the warm-start prefix {ref!r} does not exist "
                                 "(it was deleted after the job was created)", "warm_start"))
    kv = _read_prefix(job, found.sha256, label=ref, what="warm-start prefix", param="warm_start",
                      invalid="invalid_warm_start", blobs=blobs, loaded=loaded,
                      max_virtual_tokens=max_virtual_tokens, max_bytes=max_bytes)
    log.info("job %s warm-starts from %s (version %d)", job.id, name, found.version)
    return kv


def load_base(job: TrainingJob, *, sessions: sessionmaker[Session], blobs: BlobStore, loaded: LoadedModel,
              max_virtual_tokens: int, max_bytes: int) -> PrefixKV | None:
    """The frozen base the job trains on top of (`options.on_top_of`, pinned versions), its parts concatenated
    as they are served: keys/values [L, H_kv, Pb, D] on the model's device, in its dtype. None without one."""
    bases = bases_of(job)
    if not bases:
        return None
    # torch: prefix_store's stack imports it, and app/training's job modules stay torch-free at import
    from prefix_store.stack import concat_prefixes
    from prefix_store.types import PrefixKV  # the same reason

    catalog, parts = DbCatalog(sessions), []
    for base in bases:
        found = catalog.lookup(job.tenant_id, base.name, base.version)
        if found is None or found.prefix_id != base.prefix_id:  # deleted (or deleted and made again) meanwhile
            raise JobFailed(JobError("base_prefix_not_found", f"the base prefix {base.label!r} does not exist (it "
                                     "was deleted after the job was created)", "on_top_of"))
        kv = _read_prefix(job, found.sha256, label=base.label, what="base prefix", param="on_top_of",
                          invalid="invalid_base_prefix", blobs=blobs, loaded=loaded,
                          max_virtual_tokens=max_virtual_tokens, max_bytes=max_bytes)
        if not isinstance(kv, PrefixKV):  # refused when the job was created; a version cannot change kind
            raise JobFailed(JobError("invalid_base_prefix", f"the base prefix {base.label!r} is a soft prompt, "
                                     "which never stacks", "on_top_of"))
        parts.append(dataclasses.replace(kv, keys=kv.keys.to(loaded.device, loaded.dtype),
                                         values=kv.values.to(loaded.device, loaded.dtype)))
    log.info("job %s trains on top of %s", job.id, "+".join(b.label for b in bases))
    return concat_prefixes(parts)


@dataclass(frozen=True)
class ResumePoint:
    """The job's latest checkpoint: its step, prefix, and the run's state (None in a prefix-only checkpoint)."""

    step: int
    prefix: PrefixTensors
    state: TrainState | None


def load_resume_point(job: TrainingJob, *, sessions: sessionmaker[Session], blobs: BlobStore, loaded: LoadedModel,
                      max_virtual_tokens: int, max_bytes: int) -> ResumePoint | None:
    """The job's latest checkpoint — left by an earlier attempt that was interrupted (it checkpoints on the way
    out) or died after a periodic checkpoint — or None. An unreadable checkpoint is skipped: the attempt then
    starts over, which is always correct."""
    # torch: train_state and prefix_store's codec import it, and app/training's job modules stay torch-free at import
    from app.training.train_state import decode_checkpoint
    from prefix_store.codec import decode_stored  # the same reason
    from prefix_store.types import PrefixError  # the same reason

    with sessions() as session:
        row = session.execute(sa.select(JobCheckpoint.step, JobCheckpoint.sha256)
                              .where(JobCheckpoint.job_id == job.id)
                              .order_by(JobCheckpoint.step.desc()).limit(1)).first()
    if row is None:
        return None
    try:
        native, state = decode_checkpoint(blobs.get(row.sha256))
        kv = decode_stored(native, spec=loaded.spec, max_virtual_tokens=max_virtual_tokens, max_bytes=max_bytes)
    except (BlobNotFound, BlobStoreUnavailable, PrefixError, ValueError) as exc:
        log.warning("job %s: checkpoint at step %d unusable (%r); starting over", job.id, row.step, exc)
        return None
    return ResumePoint(int(row.step), kv, state)
