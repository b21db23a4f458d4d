"""Job queues and recovery: the in-process worker thread, arq over real Redis, and the sweep.

The sweep runs on SQLite and PostgreSQL; arq runs against the real Redis of the test environment (db 15).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix

from app.config import Settings
from app.db.models import TrainingJob, utcnow
from app.engine.model import LoadedModel
from app.jobs.lease import claim
from app.jobs.queue import QueueUnavailable
from app.jobs.recovery import sweep
from app.jobs.types import TrainConfig
from app.training.arq_queue import QUEUE_NAME, ArqJobQueue
from app.training.inprocess import InProcessJobQueue
from tests.training.job_support import JobEnv, open_env

LONG = TrainConfig(num_virtual_tokens=4, batch_size=4, max_steps=100_000)


@pytest.fixture(params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, tmp_path: Path, tiny_llama: LoadedModel) -> Iterator[JobEnv]:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if request.param == "sqlite" else request.getfixturevalue(
        "postgres_url")
    yield from open_env(url, tmp_path, tiny_llama, job_sweep_interval_s=0.2)


@pytest.fixture
def sqlite_env(tmp_path: Path, tiny_llama: LoadedModel) -> Iterator[JobEnv]:
    yield from open_env(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, tiny_llama, job_sweep_interval_s=0.2)


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _age(env: JobEnv, job_id: str, seconds: float) -> None:
    """Make the job's last heartbeat `seconds` old (as if its worker had died that long ago)."""
    with env.sessions() as s:
        s.execute(sa.update(TrainingJob).where(TrainingJob.id == job_id)
                  .values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))
        s.commit()


# ---- the recovery sweep ------------------------------------------------------------------------------------------
def test_sweep_requeues_stale_jobs_then_fails_them_at_max_attempts(env: JobEnv) -> None:
    stale, fresh, queued = env.add_job(), env.add_job(), env.add_job()
    assert claim(env.sessions, stale) is not None and claim(env.sessions, fresh) is not None
    _age(env, stale, 120)

    found = sweep(env.sessions, stale_after_s=60, max_attempts=2)
    assert (found.requeued, found.failed) == ([stale], [])
    assert set(found.queued) == {stale, queued}  # the caller makes sure a queue carries each
    job = env.job(stale)
    assert (job.status, job.attempts, job.heartbeat_at) == ("queued", 1, None)
    assert "re-queued (attempt 1 of 2 failed)" in env.events(stale)[-1].message
    assert env.job(fresh).status == "running"  # beating recently: untouched

    assert claim(env.sessions, stale) is not None  # attempt 2 ... whose worker dies too
    _age(env, stale, 120)
    found = sweep(env.sessions, stale_after_s=60, max_attempts=2)
    assert (found.requeued, found.failed) == ([], [stale])
    job = env.job(stale)
    assert job.status == "failed" and job.error is not None and job.error["code"] == "worker_lost"
    assert job.finished_at is not None and job.result_prefix_version_id is None


def test_sweep_finishes_cancelled_jobs(env: JobEnv) -> None:
    running, queued = env.add_job(), env.add_job()
    assert claim(env.sessions, running) is not None
    env.set_cancel(running)
    env.set_cancel(queued)
    _age(env, running, 120)
    found = sweep(env.sessions, stale_after_s=60, max_attempts=3)
    assert sorted(found.cancelled) == sorted([running, queued]) and found.queued == []
    assert env.job(running).status == env.job(queued).status == "cancelled"


def test_sweep_fails_jobs_stuck_in_validation(env: JobEnv) -> None:
    """An API process that died while validating leaves `validating_files`; the sweep fails such a job once it is
    older than the stale cutoff, and leaves one that is still being validated."""
    stuck, fresh = env.add_job(), env.add_job()
    with env.sessions() as s:
        s.execute(sa.update(TrainingJob).where(TrainingJob.id.in_([stuck, fresh])).values(status="validating_files"))
        s.execute(sa.update(TrainingJob).where(TrainingJob.id == stuck)
                  .values(created_at=utcnow() - timedelta(seconds=120)))
        s.commit()
    found = sweep(env.sessions, stale_after_s=60, max_attempts=2)
    assert found.failed == [stuck] and stuck not in found.queued
    job = env.job(stuck)
    assert job.status == "failed" and job.error is not None and job.error["code"] == "validation_interrupted"
    assert env.job(fresh).status == "validating_files"


def test_sweep_leaves_a_job_whose_heartbeat_arrives_after_it_looked(env: JobEnv) -> None:
    job_id = env.add_job()
    lease = claim(env.sessions, job_id)
    assert lease is not None
    _age(env, job_id, 120)
    beaten: list[bool] = []

    def beat_once(_session: object) -> None:
        # Right after the sweep's SELECT saw the stale heartbeat (it ends that read with a rollback), the slow
        # worker beats: the sweep's conditional UPDATE must then match nothing.
        if not beaten:
            beaten.append(True)
            lease.beat()

    sa.event.listen(env.sessions, "after_rollback", beat_once)
    try:
        found = sweep(env.sessions, stale_after_s=60, max_attempts=3)
    finally:
        sa.event.remove(env.sessions, "after_rollback", beat_once)
    assert beaten and found.requeued == [] and env.job(job_id).status == "running"


# ---- the in-process worker ---------------------------------------------------------------------------------------
def test_in_process_queue_runs_jobs_and_picks_up_orphans(env: JobEnv) -> None:
    queue = InProcessJobQueue(env.ctx())
    enqueued = env.add_job()
    asyncio.run(queue.enqueue(enqueued))
    asyncio.run(queue.enqueue(enqueued))  # a duplicate is a no-op: one entry waits
    assert queue._pending.qsize() == 1
    queue.start()
    try:
        # Created while Redis was down / by a replica with job_queue=none: never enqueued here.
        orphan = env.add_job(name="other")
        wait_for(lambda: env.job(enqueued).status == env.job(orphan).status == "succeeded", what="both jobs")
        assert env.job(enqueued).attempts == env.job(orphan).attempts == 1
    finally:
        queue.stop()
    assert not queue.alive


def test_stopping_the_in_process_worker_hands_the_running_job_back(sqlite_env: JobEnv) -> None:
    env = sqlite_env
    queue = InProcessJobQueue(env.ctx())
    queue.start()
    job_id = env.add_job(config=LONG)
    asyncio.run(queue.enqueue(job_id))
    wait_for(lambda: env.job(job_id).status == "running", what="the job to start")
    queue.stop()
    assert not queue.alive
    job = env.job(job_id)
    assert (job.status, job.attempts) == ("queued", 1)
    assert env.events(job_id)[-1].message == "the worker is shutting down; job re-queued"


# ---- arq over Redis ----------------------------------------------------------------------------------------------
def test_arq_queue_enqueues_once_and_repairs_a_dead_workers_claim(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)

    async def scenario() -> None:
        queue = ArqJobQueue(redis_url)
        try:
            await queue.enqueue("ftjob-a")
            await queue.enqueue("ftjob-a")
            assert r.zrange(QUEUE_NAME, 0, -1) == [b"ftjob-a"]
            await queue.ensure_queued("ftjob-a")  # waiting: untouched
            score = r.zscore(QUEUE_NAME, "ftjob-a")
            # A worker took it (arq's in-progress key, held for the job timeout): it may be about to claim the
            # job in the database, so a plain sweep leaves it; once the sweep saw it die, its claim is replaced.
            r.set(in_progress_key_prefix + "ftjob-a", b"1", px=3_600_000)
            await queue.ensure_queued("ftjob-a")
            assert r.exists(in_progress_key_prefix + "ftjob-a") and r.zscore(QUEUE_NAME, "ftjob-a") == score
            await queue.ensure_queued("ftjob-a", replace_claim=True)
            assert not r.exists(in_progress_key_prefix + "ftjob-a") and r.exists(job_key_prefix + "ftjob-a")
            assert r.zrange(QUEUE_NAME, 0, -1) == [b"ftjob-a"] and r.zscore(QUEUE_NAME, "ftjob-a") != score
            await queue.ensure_queued("ftjob-b")  # lost by Redis (or never enqueued): enqueued now
            assert sorted(r.zrange(QUEUE_NAME, 0, -1)) == [b"ftjob-a", b"ftjob-b"]
        finally:
            await queue.close()

    asyncio.run(scenario())
    r.close()


def test_arq_queue_reports_redis_down_without_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    """An enqueue must not hang while Redis is down: arq's pool would otherwise retry the connection (5 times,
    a second apart, by default). Counted as connection attempts, not timed: a busy machine slows every attempt,
    but never adds one."""
    attempts = 0
    ping = ArqRedis.ping

    async def counted_ping(self: ArqRedis, **kwargs: Any) -> Any:  # arq opens a pool with one PING per attempt
        nonlocal attempts
        attempts += 1
        return await ping(self, **kwargs)

    monkeypatch.setattr(ArqRedis, "ping", counted_ping)

    async def scenario() -> None:
        queue = ArqJobQueue("redis://127.0.0.1:1/0")
        with pytest.raises(QueueUnavailable, match="ftjob-x"):
            await queue.enqueue("ftjob-x")
        await queue.close()

    asyncio.run(scenario())
    assert attempts == 1


# ---- settings and start-up ---------------------------------------------------------------------------------------
def test_job_queue_setting(redis_url: str, tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).resolved_job_queue == "inprocess"
    assert Settings(data_dir=tmp_path, redis_url=redis_url).resolved_job_queue == "arq"
    assert Settings(data_dir=tmp_path, redis_url=redis_url, job_queue="none").resolved_job_queue == "none"
    with pytest.raises(ValueError, match="arq needs PREFIXSERVE_REDIS_URL"):
        Settings(data_dir=tmp_path, job_queue="arq")


def test_the_server_runs_and_stops_its_in_process_worker(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = Settings(data_dir=tmp_path, model="random:tiny-llama", admin_key="adm-test")
    app = create_app(settings)
    with TestClient(app):
        queue = app.state.runtime.job_queue
        assert isinstance(queue, InProcessJobQueue) and queue.alive
        assert any(t.name == "training-worker" for t in threading.enumerate())
    assert not queue.alive

    app = create_app(Settings(data_dir=tmp_path, model="random:tiny-llama", admin_key="adm", job_queue="none"))
    with TestClient(app):
        assert app.state.runtime.job_queue is None
