"""The job runner's state machine on SQLite and PostgreSQL with the real trainer on random:tiny-llama.

Covers: claim → train → publish (events, checkpoints, the version servable through the resolver and the
engine), cancel while queued and while running, bad data and a missing warm start failing with the reason,
an atomic publish (a failure between blob and commit publishes nothing), a lost lease (the sweep re-queued the
job) publishing nothing while the next attempt succeeds, interrupts, and per-user personalization (resuming
an interrupted job: test_jobs_resume.py).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
import torch
from sqlalchemy.orm import Session

from app.catalog.refs import DbCatalog
from app.db.models import JobCheckpoint, Prefix, PrefixVersion, TrainingJob, utcnow
from app.engine.client import EngineClient
from app.engine.factory import build_engine, context_length
from app.engine.sampling import SamplingParams
from app.jobs.lease import claim
from app.jobs.recovery import sweep
from app.jobs.types import TrainCallbacks, TrainConfig, TrainEvent, TrainResult
from app.training.jobs import execute_job
from app.training.train_state import decode_checkpoint
from app.training.trainer import train_prefix
from prefix_store.cache_tier import InProcessTier
from prefix_store.codec import decode_native
from prefix_store.device_pool import DevicePool
from prefix_store.ref import PrefixRef
from prefix_store.resolver import PrefixResolver
from tests.engine.helpers import random_prefix
from tests.training.job_support import FAST, RECORDS, JobEnv, jsonl


def _versions(env: JobEnv) -> list[PrefixVersion]:
    with env.sessions() as s:
        return list(s.execute(sa.select(PrefixVersion).order_by(PrefixVersion.version)).scalars())


def _decode(env: JobEnv, sha: str) -> Any:
    return decode_native(env.blobs.get(sha), spec=env.loaded.spec, max_virtual_tokens=64, max_bytes=1 << 24)


def _resolver(env: JobEnv) -> PrefixResolver:
    cache = InProcessTier(ttl_s=60, max_value_bytes=1 << 24)
    return PrefixResolver(catalog=DbCatalog(env.sessions), pool=DevicePool(1 << 24), cache=cache,
                          blobs=env.blobs, spec=env.loaded.spec)


def test_job_trains_publishes_and_is_served(env: JobEnv) -> None:
    # A random start, so that six steps on the tiny model surely change what it generates (asserted below).
    config = TrainConfig(num_virtual_tokens=4, batch_size=4, max_steps=6, checkpoint_every=3,
                         early_stopping_patience=None, prefix_init="random")
    job_id = env.add_job(config=config)

    assert execute_job(job_id, ctx=env.ctx()) == "succeeded"

    job = env.job(job_id)
    assert (job.status, job.attempts, job.error) == ("succeeded", 1, None)
    assert job.trained_tokens and job.trained_tokens > 0 and job.finished_at is not None
    [version] = _versions(env)
    assert (version.id, version.version, version.source_format) == (job.result_prefix_version_id, 1, "trained")
    assert version.training_job_id == job_id and version.num_virtual_tokens == 4
    kv = _decode(env, version.sha256)
    assert kv.keys.shape == (2, 2, 4, 16) and kv.base_fingerprint == env.loaded.spec.fingerprint

    messages = [e.message for e in env.events(job_id)]
    assert messages[0] == "job started (attempt 1)" and messages[-1].startswith("job succeeded: published tuned@1")
    steps = [e.data["step"] for e in env.events(job_id) if e.data and "train_loss" in e.data]
    assert steps[0] == 1 and steps[-1] == 6  # the first and the last step are always reported
    with env.sessions() as s:
        checkpoints = list(s.execute(sa.select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
                                     .order_by(JobCheckpoint.step)).scalars())
    assert [c.step for c in checkpoints] == [3, 6]
    assert all(env.blobs.exists(c.sha256) for c in checkpoints) and "train_loss" in checkpoints[0].metrics
    # The final prefix is the step-6 checkpoint's (no validation set: the last prefix is the result); a checkpoint
    # also holds the run's state to resume from.
    assert decode_checkpoint(env.blobs.get(checkpoints[1].sha256))[0] == env.blobs.get(version.sha256)

    # Servable at once: the resolver reads the catalog, the engine generates with it.
    resolved = _resolver(env).get(env.tenant_id, "tuned")
    assert resolved.ref.version == 1 and torch.equal(resolved.kv.keys, kv.keys)
    assert _generate(env, resolved.ref) != _generate(env, None)


def _generate(env: JobEnv, ref: PrefixRef | None) -> list[int]:
    engine = build_engine(env.loaded)
    engine.start()
    client = EngineClient(engine, env.loaded.tokenizer, _resolver(env), env.loaded.spec.model_id,
                          context_length(env.loaded))

    async def run() -> list[int]:
        out = []
        async for ev in client.generate(prompt_ids=client.encode_prompt("item 4:"), prefix=ref,
                                        sampling=SamplingParams(max_tokens=8, temperature=0)):
            if ev.token_id is not None:
                out.append(ev.token_id)
        return out

    try:
        return asyncio.run(run())
    finally:
        engine.stop()


def test_claim_is_exclusive_and_finished_jobs_are_skipped(env: JobEnv) -> None:
    job_id = env.add_job()
    barrier = threading.Barrier(4)
    leases: list[Any] = []

    def grab() -> None:
        barrier.wait()
        leases.append(claim(env.sessions, job_id))

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(lease is not None for lease in leases) == [False, False, False, True]
    assert env.job(job_id).attempts == 1
    # Running elsewhere: a second worker (or a duplicate queue message) does nothing.
    assert execute_job(job_id, ctx=env.ctx()) == "skipped"
    assert env.job(job_id).status == "running"


def test_bad_data_fails_with_the_line(env: JobEnv) -> None:
    lines = jsonl(RECORDS[:2]) + b'{"prompt": "x"}\n' + jsonl(RECORDS[2:4])
    job_id = env.add_job(data=lines)

    assert execute_job(job_id, ctx=env.ctx()) == "failed"

    job = env.job(job_id)
    assert job.status == "failed" and job.error is not None
    assert job.error["code"] == "invalid_training_data" and job.error["param"] == "training_file"
    assert "line 3" in job.error["message"] and "completion" in job.error["message"]
    last = env.events(job_id)[-1]
    assert last.level == "error" and "line 3" in last.message
    assert _versions(env) == []


def test_example_longer_than_the_context_fails_with_its_line(sqlite_env: JobEnv) -> None:
    room = context_length(sqlite_env.loaded) - FAST.num_virtual_tokens
    job_id = sqlite_env.add_job(data=jsonl([*RECORDS[:4], {"prompt": "y" * room, "completion": "z"}]))
    assert execute_job(job_id, ctx=sqlite_env.ctx()) == "failed"
    error = sqlite_env.job(job_id).error
    assert error is not None and "line 5" in error["message"] and f"at most {room}" in error["message"]


def test_cancel_while_queued(env: JobEnv) -> None:
    job_id = env.add_job()
    env.set_cancel(job_id)
    assert execute_job(job_id, ctx=env.ctx()) == "skipped"
    job = env.job(job_id)
    assert (job.status, job.attempts) == ("cancelled", 0) and job.finished_at is not None
    assert env.events(job_id)[-1].message == "job cancelled before it started"


def test_cancel_while_running_publishes_nothing(env: JobEnv) -> None:
    job_id = env.add_job(config=TrainConfig(num_virtual_tokens=4, batch_size=4, max_steps=100_000))

    def train_then_cancel(*args: Any, callbacks: TrainCallbacks, **kw: Any) -> TrainResult:
        def on_event(ev: TrainEvent) -> None:
            callbacks.on_event(ev)
            if ev.step == 2:
                env.set_cancel(job_id)  # as POST /v1/fine_tuning/jobs/{id}/cancel does

        wrapped = TrainCallbacks(on_event=on_event, should_stop=callbacks.should_stop,
                                 on_checkpoint=callbacks.on_checkpoint)
        return train_prefix(*args, callbacks=wrapped, **kw)

    assert execute_job(job_id, ctx=env.ctx(train=train_then_cancel), timeout_s=120) == "cancelled"
    job = env.job(job_id)
    assert job.status == "cancelled" and job.result_prefix_version_id is None and job.finished_at is not None
    assert env.events(job_id)[-1].message == "job cancelled; nothing was published"
    assert _versions(env) == []


def test_failure_between_blob_and_commit_publishes_nothing(sqlite_env: JobEnv) -> None:
    env = sqlite_env
    job_id = env.add_job()
    blobs_before = set(p.name for p in (env.blobs.root).rglob("*") if p.is_file())

    def refuse_version_commit(session: Session) -> None:
        if any(isinstance(o, PrefixVersion) for o in session.identity_map.values()):
            raise RuntimeError("injected: the database went away at commit")

    sa.event.listen(env.sessions, "before_commit", refuse_version_commit)
    try:
        assert execute_job(job_id, ctx=env.ctx()) == "failed"
    finally:
        sa.event.remove(env.sessions, "before_commit", refuse_version_commit)

    job = env.job(job_id)
    assert job.status == "failed" and job.error is not None and job.error["code"] == "internal_error"
    assert "injected" in job.error["message"] and job.result_prefix_version_id is None
    assert _versions(env) == []
    with env.sessions() as s:
        assert s.execute(sa.select(Prefix)).first() is None
    # The trained prefix's blob was written first and collected again: only the training file is left.
    assert set(p.name for p in env.blobs.root.rglob("*") if p.is_file()) == blobs_before


def test_a_lost_lease_publishes_nothing_and_the_next_attempt_succeeds(env: JobEnv) -> None:
    job_id = env.add_job()

    def train_while_presumed_dead(*args: Any, **kw: Any) -> TrainResult:
        result = train_prefix(*args, **kw)
        # Meanwhile the sweep saw no heartbeat for too long (clock moved on) and re-queued the job.
        found = sweep(env.sessions, stale_after_s=60, max_attempts=3, now=utcnow() + timedelta(hours=1))
        assert found.requeued == [job_id] and found.queued == [job_id]
        return result

    assert execute_job(job_id, ctx=env.ctx(train=train_while_presumed_dead)) == "lost"
    job = env.job(job_id)
    assert (job.status, job.attempts, job.result_prefix_version_id) == ("queued", 1, None)
    assert _versions(env) == []
    assert not any(e.message.startswith("job succeeded") for e in env.events(job_id))

    assert execute_job(job_id, ctx=env.ctx()) == "succeeded"
    job = env.job(job_id)
    assert (job.status, job.attempts) == ("succeeded", 2)
    assert [(v.version, v.training_job_id) for v in _versions(env)] == [(1, job_id)]


def test_a_database_outage_during_set_up_hands_the_job_back(sqlite_env: JobEnv,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The database went away while the attempt read its inputs: another attempt, not a failed job."""
    env = sqlite_env
    job_id = env.add_job()

    def database_gone(*_: Any, **__: Any) -> Any:
        raise sa.exc.OperationalError("SELECT", {}, Exception("injected: server closed the connection"))

    monkeypatch.setattr("app.training.jobs.load_job_data", database_gone)
    assert execute_job(job_id, ctx=env.ctx()) == "requeued"
    job = env.job(job_id)
    assert (job.status, job.attempts, job.error) == ("queued", 1, None)
    assert any("database went away" in e.message for e in env.events(job_id))
    monkeypatch.undo()
    assert execute_job(job_id, ctx=env.ctx()) == "succeeded"
    assert env.job(job_id).attempts == 2


def test_diverging_training_fails_with_the_reason(sqlite_env: JobEnv) -> None:
    job_id = sqlite_env.add_job()
    bad = random_prefix(sqlite_env.loaded, 4, seed=1)
    bad.keys[0, 0, 0, 0] = float("nan")  # the codec refuses NaN, so it can only come from training itself

    def train_from_nan(*args: Any, init: Any, **kw: Any) -> TrainResult:
        return train_prefix(*args, init=bad, **kw)

    assert execute_job(job_id, ctx=sqlite_env.ctx(train=train_from_nan)) == "failed"
    error = sqlite_env.job(job_id).error
    assert error is not None and error["code"] == "training_diverged" and "learning rate" in error["message"]
    assert _versions(sqlite_env) == []


def test_warm_start_from_a_published_version_and_a_missing_one(env: JobEnv) -> None:
    first = env.add_job()
    assert execute_job(first, ctx=env.ctx()) == "succeeded"

    warm = env.add_job(config=TrainConfig(num_virtual_tokens=4, batch_size=4, max_steps=1, learning_rate=1e-6),
                       warm_start="tuned@1")
    assert execute_job(warm, ctx=env.ctx()) == "succeeded"
    v1, v2 = _versions(env)
    kv1, kv2 = (_decode(env, v.sha256) for v in (v1, v2))
    assert v2.version == 2 and torch.allclose(kv1.keys, kv2.keys, atol=1e-4)  # one tiny step from v1

    missing = env.add_job(warm_start="gone@1")
    assert execute_job(missing, ctx=env.ctx()) == "failed"
    error = env.job(missing).error
    assert error is not None and error["code"] == "warm_start_not_found" and "'gone@1'" in error["message"]
    assert len(_versions(env)) == 2


def test_interrupt_requeues_then_fails_at_max_attempts(sqlite_env: JobEnv) -> None:
    env = sqlite_env
    job_id = env.add_job(config=TrainConfig(num_virtual_tokens=4, batch_size=4, max_steps=100_000))
    interrupt = threading.Event()

    def train_and_shut_down(*args: Any, callbacks: TrainCallbacks, **kw: Any) -> TrainResult:
        def on_event(ev: TrainEvent) -> None:
            callbacks.on_event(ev)
            interrupt.set()  # the worker got SIGTERM

        return train_prefix(*args, callbacks=TrainCallbacks(on_event, callbacks.should_stop), **kw)

    ctx = env.ctx(train=train_and_shut_down)
    for attempt in (1, 2):
        interrupt.clear()
        assert execute_job(job_id, ctx=ctx, interrupt=interrupt) == "requeued"
        job = env.job(job_id)
        assert (job.status, job.attempts, job.heartbeat_at) == ("queued", attempt, None)
    interrupt.clear()
    assert execute_job(job_id, ctx=ctx, interrupt=interrupt) == "failed"
    job = env.job(job_id)
    assert job.error is not None and job.error["code"] == "interrupted" and job.attempts == 3
    assert _versions(env) == []


def test_personalization_trains_on_the_users_examples(env: JobEnv) -> None:
    user_id = env.add_user("alice", RECORDS[:6])
    job_id = env.add_job(name="user:alice", end_user_id=user_id)

    assert execute_job(job_id, ctx=env.ctx()) == "succeeded"
    with env.sessions() as s:
        prefix = s.execute(sa.select(Prefix).where(Prefix.name == "user:alice")).scalar_one()
    assert prefix.end_user_id == user_id
    assert _resolver(env).get(env.tenant_id, "user:alice").ref.version == 1
    assert env.invalidated == [(env.tenant_id, prefix.id)]  # frees the superseded version on every replica
    started = [e for e in env.events(job_id) if e.message.startswith("training on")]
    assert started[0].data == {"examples": 6, "validation_examples": 0}

    # Re-training warm-starts from the user's current prefix; `user:alice` now serves version 2.
    again = env.add_job(name="user:alice", end_user_id=user_id, warm_start="user:alice@1")
    assert execute_job(again, ctx=env.ctx()) == "succeeded"
    assert _resolver(env).get(env.tenant_id, "user:alice").ref.version == 2


def test_personalization_without_examples_fails(sqlite_env: JobEnv) -> None:
    user_id = sqlite_env.add_user("bob", [])
    job_id = sqlite_env.add_job(name="user:bob", end_user_id=user_id)
    assert execute_job(job_id, ctx=sqlite_env.ctx()) == "failed"
    error = sqlite_env.job(job_id).error
    assert error is not None and error["code"] == "no_examples"


def test_job_timeout_fails(sqlite_env: JobEnv) -> None:
    job_id = sqlite_env.add_job(config=TrainConfig(num_virtual_tokens=4, batch_size=4, max_steps=100_000))
    assert execute_job(job_id, ctx=sqlite_env.ctx(), timeout_s=0.5) == "failed"
    job = sqlite_env.job(job_id)
    assert job.error is not None and job.error["code"] == "timeout"
    with sqlite_env.sessions() as s:
        assert s.execute(sa.select(TrainingJob.status)).scalar_one() == "failed"


def test_start_event_counts_the_held_out_split(env: JobEnv) -> None:
    """Without a validation file the trainer holds out validation_split of the examples: the job says so."""
    job_id = env.add_job(data=jsonl(RECORDS[:8]), config=replace(FAST, validation_split=0.25))
    assert execute_job(job_id, ctx=env.ctx()) == "succeeded"
    started = [e for e in env.events(job_id) if e.message.startswith("training on")]
    assert started[0].data == {"examples": 6, "validation_examples": 2}
    assert started[0].message.startswith("training on 6 examples (2 validation)")
