"""Checkpoints across a job's attempts: an interrupted job (the worker's SIGTERM) resumes exactly where it stopped
and publishes the prefix an uninterrupted run publishes; an older prefix-only checkpoint still resumes (fresh
optimizer); a cancelled job (deleting an end user cancels theirs) leaves no checkpoint behind."""

from __future__ import annotations

import threading
from typing import Any

import sqlalchemy as sa
import torch

from app.catalog.versions import PrefixStores
from app.db.models import JobCheckpoint, PrefixVersion
from app.jobs.lease import claim
from app.jobs.types import TrainCallbacks, TrainConfig, TrainEvent, TrainResult
from app.services.users import delete_user
from app.training.jobs import execute_job
from app.training.train_state import decode_checkpoint
from app.training.trainer import train_prefix
from prefix_store.codec import decode_native
from tests.training.job_support import RECORDS, JobEnv

# Warm-up over half the run and a validation hold-out: a resume that restarted the optimizer, the schedule, the
# data order or the best-prefix tracking would publish another prefix.
CONFIG = TrainConfig(num_virtual_tokens=4, batch_size=4, max_steps=12, warmup_ratio=0.5, validation_split=0.25,
                     eval_every=2, early_stopping_patience=None)


def _interrupt_at(env: JobEnv, job_id: str, step: int) -> None:
    """Run the job's first attempt until the worker is shut down (SIGTERM) after `step` steps."""
    interrupt = threading.Event()

    def train_and_shut_down(*args: Any, callbacks: TrainCallbacks, **kw: Any) -> TrainResult:
        def on_event(ev: TrainEvent) -> None:
            callbacks.on_event(ev)
            if ev.step == step:
                interrupt.set()

        return train_prefix(*args, callbacks=TrainCallbacks(on_event, callbacks.should_stop), **kw)

    assert execute_job(job_id, ctx=env.ctx(train=train_and_shut_down), interrupt=interrupt) == "requeued"


def _checkpoints(env: JobEnv, job_id: str) -> list[JobCheckpoint]:
    with env.sessions() as s:
        return list(s.execute(sa.select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)).scalars())


def _published(env: JobEnv, job_id: str) -> PrefixVersion:
    with env.sessions() as s:
        return s.execute(sa.select(PrefixVersion).where(PrefixVersion.training_job_id == job_id)).scalar_one()


def test_an_interrupted_job_resumes_exactly_and_publishes_what_an_uninterrupted_one_does(env: JobEnv) -> None:
    whole = env.add_job(config=CONFIG, name="whole")
    assert execute_job(whole, ctx=env.ctx()) == "succeeded"

    job_id = env.add_job(config=CONFIG, name="resumed")
    _interrupt_at(env, job_id, 5)
    assert [(c.step, c.metrics) for c in _checkpoints(env, job_id)] == [(5, {"interrupted": 1.0})]
    first_start = env.job(job_id).started_at
    assert execute_job(job_id, ctx=env.ctx()) == "succeeded"

    # Bit-identical prefix (and metadata): the very same blob.
    assert _published(env, job_id).sha256 == _published(env, whole).sha256
    job = env.job(job_id)
    assert job.attempts == 2 and job.started_at == first_start  # the first attempt's start, kept
    assert job.trained_tokens == env.job(whole).trained_tokens
    resumed = [e for e in env.events(job_id) if e.message == "resuming from the checkpoint at step 5 of 12"]
    assert resumed[0].data == {"resumed_from_step": 5, "optimizer_state": True}
    steps = [e.data["step"] for e in env.events(job_id) if e.data and "train_loss" in e.data]
    assert steps[-1] == 12 and all(e.data["total_steps"] == 12 for e in env.events(job_id)
                                   if e.data and "total_steps" in e.data)


def test_a_prefix_only_checkpoint_still_resumes_with_a_fresh_optimizer(sqlite_env: JobEnv) -> None:
    """A checkpoint of the older kind (the native prefix alone) resumes as it always did: its prefix as the start,
    the steps left, a fresh optimizer and warm-up, the job's step numbering carrying on."""
    env = sqlite_env
    job_id = env.add_job(config=CONFIG)
    _interrupt_at(env, job_id, 5)
    (row,) = _checkpoints(env, job_id)
    native, state = decode_checkpoint(env.blobs.get(row.sha256))
    assert state is not None
    with env.sessions() as s:  # rewrite it as an older worker stored it
        s.execute(sa.update(JobCheckpoint).where(JobCheckpoint.id == row.id).values(sha256=env.blobs.put(native)))
        s.commit()
    saved = decode_native(native, spec=env.loaded.spec, max_virtual_tokens=64, max_bytes=1 << 24)

    seen: list[tuple[Any, TrainConfig, dict[str, Any]]] = []

    def train_and_record(*args: Any, init: Any = None, **kw: Any) -> TrainResult:
        seen.append((init, args[3], kw))
        return train_prefix(*args, init=init, **kw)

    assert execute_job(job_id, ctx=env.ctx(train=train_and_record)) == "succeeded"
    init, config, kw = seen[0]
    assert torch.equal(init.keys, saved.keys) and config.max_steps == 7 and "resume" not in kw  # 12 - 5
    resumed = [e for e in env.events(job_id) if e.message == "resuming from the checkpoint at step 5 of 12"]
    assert resumed[0].data == {"resumed_from_step": 5, "optimizer_state": False}
    steps = [e.data["step"] for e in env.events(job_id) if e.data and "train_loss" in e.data]
    assert steps[-1] == 12


def test_a_checkpoint_after_the_cancel_request_is_refused(sqlite_env: JobEnv) -> None:
    env = sqlite_env
    job_id = env.add_job()
    lease = claim(env.sessions, job_id)
    assert lease is not None and lease.checkpoint(1, "a" * 64, {}) == []
    env.set_cancel(job_id)
    assert lease.checkpoint(2, "b" * 64, {}) is None  # the worker's heartbeat has not seen the request yet
    assert [c.step for c in _checkpoints(env, job_id)] == [1]


def test_deleting_a_user_mid_training_leaves_no_checkpoint(env: JobEnv) -> None:
    """The user is deleted between two of their job's checkpoints, before the worker notices the cancel: no
    checkpoint row or blob of theirs outlives the deletion."""
    user_id = env.add_user("carol", RECORDS)
    job_id = env.add_job(name="user:carol", end_user_id=user_id,
                         config=TrainConfig(num_virtual_tokens=4, batch_size=4, max_steps=100_000, checkpoint_every=1))
    stores = PrefixStores(blobs=env.blobs, spec=env.loaded.spec, max_virtual_tokens=64, max_bytes=1 << 24,
                          invalidate=lambda _t, _p: None)

    def train_then_delete_user(*args: Any, callbacks: TrainCallbacks, **kw: Any) -> TrainResult:
        def on_event(ev: TrainEvent) -> None:
            callbacks.on_event(ev)
            if ev.step == 3:  # as DELETE /v1/users/carol does; the step's checkpoint comes right after
                with env.sessions() as s:
                    delete_user(session=s, stores=stores, tenant_id=env.tenant_id, user_id="carol")

        wrapped = TrainCallbacks(on_event=on_event, should_stop=callbacks.should_stop,
                                 on_checkpoint=callbacks.on_checkpoint)
        return train_prefix(*args, callbacks=wrapped, **kw)

    assert execute_job(job_id, ctx=env.ctx(train=train_then_delete_user), timeout_s=120) == "cancelled"
    assert _checkpoints(env, job_id) == []
    assert [p for p in env.blobs.root.rglob("*") if p.is_file()] == []  # the user's examples are rows, not blobs
    saved = [e.data["step"] for e in env.events(job_id) if e.message.startswith("checkpoint saved")]
    assert saved == [1, 2]  # before the deletion (then erased with it)
