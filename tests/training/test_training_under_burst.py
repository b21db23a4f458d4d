"""A burst of requests that exhausts the serving pool's connections leaves the in-process training worker alone:
its job trains and publishes, and its recovery sweeps keep running, while every request gets an answer (a 200, or
a 503/429 with Retry-After: never a 500)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

import app.training.inprocess as inprocess
from app.config import Settings
from app.db.models import TrainingJob
from app.db.session import make_engine, make_session_factory
from app.jobs import recovery
from app.jobs.job_config import job_columns
from app.jobs.recovery import SweepResult
from app.jobs.types import TrainConfig
from app.main import create_app
from tests.training.job_support import RECORDS, jsonl

ADMIN = "adm-burst"
CLIENTS = 100
SWEEPS_DURING_BURST = 3


class SweepSpy:
    """Counts the worker's recovery sweeps that ran to the end, and those that raised, while a burst is on."""

    def __init__(self) -> None:
        self.burst_on = False
        self.completed_during_burst = 0
        self.errors: list[BaseException] = []
        self.three_done = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    def wrap(self, sweep: Any) -> Any:
        def spied(*args: Any, **kwargs: Any) -> SweepResult:
            try:
                result: SweepResult = sweep(*args, **kwargs)
            except BaseException as exc:
                self.errors.append(exc)
                raise
            if self.burst_on:
                self.completed_during_burst += 1
                if self.completed_during_burst >= SWEEPS_DURING_BURST and self.loop is not None:
                    self.loop.call_soon_threadsafe(self.three_done.set)
            return result
        return spied


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> SweepSpy:
    s = SweepSpy()
    monkeypatch.setattr(inprocess, "sweep", s.wrap(recovery.sweep))  # where the worker looks it up
    return s


def _add_job(url: str, *, tenant_id: str, file_id: str) -> str:
    """A queued job, inserted as the fine-tuning API inserts it, through connections of the test's own (the
    server's one connection is held)."""
    hyper, options = job_columns(TrainConfig(num_virtual_tokens=4, batch_size=4, max_steps=20, prefix_init="random"))
    db = make_engine(url)
    try:
        with make_session_factory(db)() as s:
            job = TrainingJob(tenant_id=tenant_id, status="queued", model="random:tiny-llama", training_file_id=file_id,
                              prefix_name="burst", hyperparameters=hyper, options=options)
            s.add(job)
            s.commit()
            return job.id
    finally:
        db.dispose()


def _job(url: str, job_id: str) -> TrainingJob:
    db = make_engine(url)
    try:
        with make_session_factory(db)() as s:
            row = s.get(TrainingJob, job_id)
            assert row is not None
            s.expunge(row)
            return row
    finally:
        db.dispose()


async def test_an_exhausted_pool_under_a_burst_leaves_training_and_its_sweeps_alone(
        tmp_path: Path, spy: SweepSpy) -> None:
    settings = Settings(data_dir=tmp_path, model="random:tiny-llama", admin_key=ADMIN, database_pool_size=1,
                        database_max_overflow=0, job_heartbeat_s=0.2, job_sweep_interval_s=0.05,
                        tenant_max_concurrent_requests=None, tenant_requests_per_minute=None)
    url = settings.resolved_database_url
    app = create_app(settings)
    spy.loop = asyncio.get_running_loop()
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as c:
        r = await c.post("/admin/tenants", headers={"Authorization": f"Bearer {ADMIN}"}, json={"name": "a"})
        tenant_id, auth = r.json()["id"], {"Authorization": f"Bearer {r.json()['api_key']}"}
        r = await c.post("/v1/files", headers=auth, files={"file": ("t.jsonl", jsonl(RECORDS))},
                         data={"purpose": "fine-tune"})
        file_id = r.json()["id"]

        statuses: Counter[int] = Counter()
        stop = asyncio.Event()

        async def client(i: int) -> None:
            while not stop.is_set():
                if i % 2:
                    r = await c.post("/v1/completions", headers=auth, json={
                        "model": "random:tiny-llama", "prompt": f"p{i}", "max_tokens": 2})
                else:
                    r = await c.get("/v1/prefixes", headers=auth)  # a route with its own session
                statuses[r.status_code] += 1
                assert r.status_code == 503 and r.headers["retry-after"], r.text
                await asyncio.sleep(0)

        runtime = app.state.runtime
        with runtime.db.connect() as held:  # the serving pool's only connection, for the whole burst
            held.execute(sa.text("SELECT 1"))
            spy.burst_on = True
            burst = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
            try:
                await asyncio.wait_for(spy.three_done.wait(), 120)  # sweeps of the idle worker
                job_id = await asyncio.to_thread(_add_job, url, tenant_id=tenant_id, file_id=file_id)
                while (job := await asyncio.to_thread(_job, url, job_id)).status not in (
                        "succeeded", "failed", "cancelled"):  # a sweep hands it to the worker
                    await asyncio.sleep(0.05)
            finally:
                stop.set()
                spy.burst_on = False
                await asyncio.gather(*burst)

        assert (job.status, job.error) == ("succeeded", None), job.error
        assert job.attempts == 1  # never handed back for another attempt
        assert spy.errors == [] and spy.completed_during_burst >= SWEEPS_DURING_BURST
        assert statuses[503] >= CLIENTS, statuses  # every client was shed while the pool was exhausted
        r = await c.post("/v1/completions", headers=auth, json={"model": "burst@1", "prompt": "x",
                                                                 "max_tokens": 2})
        assert r.status_code == 200, r.text
