"""Fixtures and helpers of the Files / Fine-tuning / Users API tests.

`train_api` is the real app (lifespan run) on `random:tiny-llama` (byte tokenizer: one token per byte, context
2048), once on SQLite and once on PostgreSQL. No worker runs (`job_queue="none"`): the runtime's job queue is
a `RecordingQueue`, so the tests see which job ids were handed to workers, and jobs stay `queued` until a test
moves them (as a worker would) through the database.

Import as `from tests.api.fixtures_training import train_api_fixture  # noqa: F401` (registered as `train_api`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from httpx import Response

from app.db.migrate import upgrade
from app.db.models import TrainingJob
from app.jobs.queue import QueueUnavailable
from tests.api.fixtures_admin import Api, bearer, make_api

CONTEXT = 2048  # random:tiny-llama's max_position_embeddings; one token per byte


class RecordingQueue:
    """A JobQueue (app/jobs/queue.py) that records job ids instead of running them."""

    def __init__(self) -> None:
        self.enqueued: list[str] = []
        self.down = False  # True: enqueue raises QueueUnavailable, as arq does when Redis is unreachable

    async def enqueue(self, job_id: str) -> None:
        if self.down:
            raise QueueUnavailable("redis is down")
        self.enqueued.append(job_id)

    async def close(self) -> None:
        pass


def run_train_api(request: pytest.FixtureRequest, data_dir: Path, **overrides: Any) -> Iterator[Api]:
    """The app on the database `request.param` names ("sqlite" or "postgresql"), with a RecordingQueue."""
    if getattr(request, "param", "sqlite") == "postgresql":
        url = request.getfixturevalue("postgres_url")
        upgrade(url)
        overrides["database_url"] = url
    for api in make_api(data_dir, job_queue="none", **overrides):
        api.client.app.state.runtime = replace(api.runtime, job_queue=RecordingQueue())  # type: ignore[attr-defined]
        yield api


@pytest.fixture(name="train_api", params=["sqlite", "postgresql"])
def train_api_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    yield from run_train_api(request, tmp_path)


def queue_of(api: Api) -> RecordingQueue:
    q = api.runtime.job_queue
    assert isinstance(q, RecordingQueue)
    return q


def pc(i: int, pad: int = 0) -> dict[str, str]:
    """A prompt/completion example (the completion echoes the prompt's value)."""
    return {"prompt": f"name: N{i}{'x' * pad} =>", "completion": f" N{i}."}


def jsonl(records: list[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def upload_file(api: Api, key: str, data: bytes, *, filename: str = "train.jsonl", purpose: str = "fine-tune"
                ) -> Response:
    return api.client.post("/v1/files", headers=bearer(key), data={"purpose": purpose},
                           files={"file": (filename, data, "application/jsonl")})


def file_id(api: Api, key: str, n: int = 4) -> str:
    r = upload_file(api, key, jsonl([pc(i) for i in range(n)]))
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def create_job(api: Api, key: str, **body: Any) -> Response:
    body.setdefault("model", api.spec.model_id)
    return api.client.post("/v1/fine_tuning/jobs", headers=bearer(key), json=body)


def rows(api: Api, model: type[Any]) -> int:
    """How many rows `model`'s table holds (all tenants)."""
    with api.runtime.sessions() as s:
        return int(s.scalar(sa.select(sa.func.count()).select_from(model)) or 0)


def set_status(api: Api, job_id: str, status: str, **values: Any) -> None:
    """Move a job as a worker would (the tests have no worker)."""
    with api.runtime.sessions() as s:
        s.execute(sa.update(TrainingJob).where(TrainingJob.id == job_id).values(status=status, **values))
        s.commit()
