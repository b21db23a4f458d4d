"""Test support for the job runner: a database + blob store + tiny model, and rows as the API creates them.

Rows are inserted with the ORM the way the fine-tuning/users services create them (status `queued`, the
TrainConfig stored with `job_columns`), so these tests do not depend on the HTTP layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.migrate import upgrade
from app.db.models import EndUser, File, JobEvent, Tenant, TrainingJob, UserExample
from app.db.session import make_engine, make_session_factory
from app.engine.model import LoadedModel
from app.jobs.job_config import job_columns
from app.jobs.types import TrainConfig
from app.training.jobs import JobContext
from prefix_store.blobs import FileBlobStore

# A task the tiny model learns in a few steps: a short prompt, a fixed-format completion.
RECORDS = [{"prompt": f"item {i}:", "completion": f" <{i % 3}>"} for i in range(12)]

FAST = TrainConfig(num_virtual_tokens=4, batch_size=4, max_steps=6, learning_rate=3e-2, eval_every=3,
                   early_stopping_patience=None)


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@dataclass
class JobEnv:
    """One database (SQLite or PostgreSQL), a blob directory, the tiny model and a tenant."""

    url: str
    sessions: sessionmaker[Session]
    blobs: FileBlobStore
    loaded: LoadedModel
    settings: Settings
    tenant_id: str
    invalidated: list[tuple[str, str]] = field(default_factory=list)

    def ctx(self, **kw: Any) -> JobContext:
        return JobContext(sessions=self.sessions, blobs=self.blobs, loaded=self.loaded, settings=self.settings,
                          invalidate=lambda t, p: self.invalidated.append((t, p)), **kw)

    def add_file(self, data: bytes, *, tenant_id: str | None = None) -> str:
        sha = self.blobs.put(data)
        with self.sessions() as s:
            row = File(tenant_id=tenant_id or self.tenant_id, filename="train.jsonl", purpose="fine-tune",
                       bytes=len(data), sha256=sha, line_count=data.count(b"\n"), status="processed")
            s.add(row)
            s.commit()
            return row.id

    def add_job(self, *, data: bytes | None = None, config: TrainConfig = FAST, name: str = "tuned",
                warm_start: str | None = None, end_user_id: str | None = None,
                validation: bytes | None = None, **columns: Any) -> str:
        hyper, options = job_columns(config, warm_start=warm_start)
        file_id = self.add_file(data if data is not None else jsonl(RECORDS)) if end_user_id is None else None
        val_id = self.add_file(validation) if validation is not None else None
        with self.sessions() as s:
            job = TrainingJob(tenant_id=self.tenant_id, status="queued", model=self.loaded.spec.model_id,
                              training_file_id=file_id, validation_file_id=val_id, end_user_id=end_user_id,
                              prefix_name=name, hyperparameters=hyper, options=options, **columns)
            s.add(job)
            s.commit()
            return job.id

    def add_user(self, external_id: str, records: list[dict[str, Any]]) -> str:
        with self.sessions() as s:
            user = EndUser(tenant_id=self.tenant_id, external_id=external_id)
            s.add(user)
            s.flush()
            s.add_all(UserExample(end_user_id=user.id, data=r) for r in records)
            s.commit()
            return user.id

    def job(self, job_id: str) -> TrainingJob:
        with self.sessions() as s:
            row = s.get(TrainingJob, job_id)
            assert row is not None
            return row

    def events(self, job_id: str) -> list[JobEvent]:
        with self.sessions() as s:
            return list(s.execute(sa.select(JobEvent).where(JobEvent.job_id == job_id)
                                  .order_by(JobEvent.created_at, JobEvent.id)).scalars())

    def set_cancel(self, job_id: str) -> None:
        with self.sessions() as s:
            s.execute(sa.update(TrainingJob).where(TrainingJob.id == job_id).values(cancel_requested=True))
            s.commit()


def open_env(url: str, tmp: Path, loaded: LoadedModel, **settings: Any) -> Iterator[JobEnv]:
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    with sessions() as s:
        tenant = Tenant(name="acme")
        s.add(tenant)
        s.commit()
        tenant_id = tenant.id
    cfg = Settings(data_dir=tmp, database_url=url, job_heartbeat_s=0.05, **settings)
    try:
        yield JobEnv(url, sessions, FileBlobStore(tmp / "blobs"), loaded, cfg, tenant_id)
    finally:
        engine.dispose()
