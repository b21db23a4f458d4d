"""`prefixserve worker` end to end: real subprocesses on PostgreSQL, Redis and a shared file object store.

The test process plays the API (it creates the rows and enqueues through ArqJobQueue); the workers load
random:tiny-llama. Worker crash: SIGKILL mid-job, then a second worker's start-up sweep re-queues the job (its
heartbeat went stale) and finishes it; the killed attempt published nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.db.models import PrefixVersion
from app.engine.model import LoadedModel
from app.jobs.types import TrainConfig
from app.training.arq_queue import ArqJobQueue
from tests.training.job_support import JobEnv, open_env
from tests.training.test_queue import wait_for

STARTUP_S = 120.0  # a worker imports torch and builds the model: slow on a busy 2-core machine


@pytest.fixture
def pg_env(postgres_url: str, tmp_path: Path, tiny_llama: LoadedModel) -> Iterator[JobEnv]:
    yield from open_env(postgres_url, tmp_path, tiny_llama)


class Workers:
    """Starts `prefixserve worker` processes sharing the test's database, Redis and blob directory."""

    def __init__(self, env: JobEnv, redis_url: str, tmp: Path) -> None:
        self.env = {
            **os.environ,
            "PREFIXSERVE_MODEL": "random:tiny-llama",
            "PREFIXSERVE_DATA_DIR": str(tmp / "worker-data"),
            "PREFIXSERVE_DATABASE_URL": env.url,
            "PREFIXSERVE_REDIS_URL": redis_url,
            "PREFIXSERVE_OBJECT_STORE_URL": f"file://{env.blobs.root}",
            "PREFIXSERVE_JOB_HEARTBEAT_S": "0.2",
            "PREFIXSERVE_JOB_STALE_AFTER_S": "3",
            "PREFIXSERVE_JOB_SWEEP_INTERVAL_S": "1",
            "PREFIXSERVE_TRAINING_TORCH_THREADS": "1",
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = tmp

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"worker-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def check(self) -> int:
        return subprocess.run([sys.executable, "-m", "app.cli", "worker", "--check"], env=self.env,
                              capture_output=True, timeout=60).returncode

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def workers(pg_env: JobEnv, redis_url: str, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(pg_env, redis_url, tmp_path)
    try:
        yield w
    finally:
        w.stop_all()
        for f in sorted(tmp_path.glob("worker-*.log")):
            sys.stderr.write(f"--- {f.name} (tail)\n{f.read_text(errors='replace')[-3000:]}\n")


def _enqueue(redis_url: str, job_id: str) -> None:
    async def go() -> None:
        queue = ArqJobQueue(redis_url)
        try:
            await queue.enqueue(job_id)
        finally:
            await queue.close()

    asyncio.run(go())


def _versions(env: JobEnv, job_id: str) -> list[PrefixVersion]:
    with env.sessions() as s:
        return list(s.execute(sa.select(PrefixVersion).where(PrefixVersion.training_job_id == job_id)).scalars())


def test_worker_runs_an_enqueued_job_and_a_job_redis_never_saw(pg_env: JobEnv, workers: Workers,
                                                               redis_url: str) -> None:
    env = pg_env
    enqueued = env.add_job()
    _enqueue(redis_url, enqueued)
    orphan = env.add_job(name="orphan")  # its enqueue "failed" (Redis down): the worker's sweep finds it
    workers.start()

    wait_for(lambda: env.job(enqueued).status == "succeeded", STARTUP_S, "the enqueued job")
    wait_for(lambda: env.job(orphan).status == "succeeded", 30, "the orphaned job")
    assert workers.check() == 0  # arq's health key is fresh
    for job_id in (enqueued, orphan):
        [version] = _versions(env, job_id)
        assert env.blobs.exists(version.sha256) and env.job(job_id).attempts == 1


def test_a_killed_worker_leaves_nothing_published_and_a_second_worker_finishes(
        pg_env: JobEnv, workers: Workers, redis_url: str) -> None:
    env = pg_env
    job_id = env.add_job(config=TrainConfig(num_virtual_tokens=4, batch_size=4, max_steps=600,
                                            early_stopping_patience=None))
    _enqueue(redis_url, job_id)
    first = workers.start()
    wait_for(lambda: any(e.data and e.data.get("step") for e in env.events(job_id)), STARTUP_S, "training steps")
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    job = env.job(job_id)
    assert (job.status, job.attempts) == ("running", 1) and _versions(env, job_id) == []

    workers.start()  # its sweep sees the stale heartbeat, re-queues the job and clears arq's dead claim
    wait_for(lambda: env.job(job_id).status == "succeeded", STARTUP_S, "the second attempt")
    job = env.job(job_id)
    assert job.attempts == 2
    [version] = _versions(env, job_id)
    assert job.result_prefix_version_id == version.id
    messages = [e.message for e in env.events(job_id)]
    assert any("worker was lost" in m and "re-queued" in m for m in messages)
    assert messages.count("job started (attempt 1)") == messages.count("job started (attempt 2)") == 1


def test_sigterm_hands_the_running_job_back(pg_env: JobEnv, workers: Workers, redis_url: str) -> None:
    env = pg_env
    job_id = env.add_job(config=TrainConfig(num_virtual_tokens=4, batch_size=4, max_steps=100_000))
    _enqueue(redis_url, job_id)
    worker = workers.start()
    wait_for(lambda: env.job(job_id).status == "running", STARTUP_S, "the job to start")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0
    job = env.job(job_id)
    assert (job.status, job.attempts) == ("queued", 1) and _versions(env, job_id) == []
    assert env.events(job_id)[-1].message == "the worker is shutting down; job re-queued"
