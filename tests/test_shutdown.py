"""Graceful shutdown of a real `prefixserve serve` process, on PostgreSQL and random:tiny-llama
with the in-process training worker.

SIGTERM while a long stream, a short request and a training job are running: the short request completes, the
stream ends with an error chunk and `[DONE]` once the grace period is over, new connections are refused, the
process exits 0 within grace + flush, and the training job is `queued` again; a new server finishes it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.db.migrate import upgrade
from app.db.models import TrainingJob
from app.server import SHUTDOWN_FLUSH_S, SHUTDOWN_MESSAGE
from tests.server_proc import ServerProcess

pytestmark = pytest.mark.slow

ADMIN_KEY = "shutdown-test-admin-key-0123456789"
GRACE_S = 1.5
JOB_TIMEOUT_S = 180.0


@pytest.fixture
def settings(postgres_url: str, tmp_path: Path) -> dict[str, str]:
    upgrade(postgres_url)
    return {"PREFIXSERVE_DATABASE_URL": postgres_url, "PREFIXSERVE_DATA_DIR": str(tmp_path / "data"),
            "PREFIXSERVE_ADMIN_KEY": ADMIN_KEY, "PREFIXSERVE_SHUTDOWN_GRACE_S": str(GRACE_S),
            "PREFIXSERVE_JOB_QUEUE": "inprocess", "PREFIXSERVE_JOB_SWEEP_INTERVAL_S": "1"}


@pytest.fixture
def servers(settings: dict[str, str]) -> Iterator[list[ServerProcess]]:
    """Started by the test; stopped before the database is dropped."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()
        print(f"--- {server.log_path.name} (tail)\n{server.log_tail()}")  # shown by pytest on failure


def _start(servers: list[ServerProcess], tmp_path: Path, settings: dict[str, str]) -> ServerProcess:
    server = ServerProcess(tmp_path / f"server-{len(servers)}.log", settings)
    servers.append(server)
    server.wait_ready()
    return server


def _tenant(url: str) -> dict[str, str]:
    r = httpx.post(url + "/admin/tenants", json={"name": "acme"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


def _start_job(url: str, auth: dict[str, str], base: str) -> str:
    lines = b"".join(json.dumps({"prompt": f"name: N{i} =>", "completion": f" N{i}."}).encode() + b"\n"
                     for i in range(16))
    r = httpx.post(url + "/v1/files", headers=auth, data={"purpose": "fine-tune"},
                   files={"file": ("train.jsonl", lines, "application/jsonl")})
    assert r.status_code == 200, r.text
    r = httpx.post(url + "/v1/fine_tuning/jobs", headers=auth, json={
        "model": base, "training_file": r.json()["id"], "suffix": "kept", "num_virtual_tokens": 4, "seed": 1,
        "hyperparameters": {"max_steps": 3000, "batch_size": 4, "checkpoint_every": 100}})
    assert r.status_code == 200, r.text
    job_id: str = r.json()["id"]
    return job_id


def _job(url: str, auth: dict[str, str], job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/fine_tuning/jobs/{job_id}", headers=auth, timeout=10)
    assert r.status_code == 200, r.text
    job: dict[str, Any] = r.json()
    return job


def _wait_job(url: str, auth: dict[str, str], job_id: str, statuses: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (job := _job(url, auth, job_id))["status"] not in statuses:
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    return job


def _stream_lines(url: str, auth: dict[str, str], body: dict[str, Any], out: dict[str, Any]) -> None:
    """A streamed completion, read to its end: its `data:` lines and when it ended go into `out`."""
    lines: list[str] = []
    try:
        with httpx.stream("POST", url + "/v1/completions", headers=auth, json={**body, "stream": True},
                          timeout=60) as r:
            out["status"] = r.status_code
            lines.extend(line for line in r.iter_lines() if line.startswith("data: "))
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    out["lines"], out["ended"] = lines, time.monotonic()


def test_sigterm_finishes_short_requests_bounds_long_ones_and_hands_the_job_back(
        servers: list[ServerProcess], settings: dict[str, str], tmp_path: Path) -> None:
    server = _start(servers, tmp_path, settings)
    auth = _tenant(server.url)
    base = httpx.get(server.url + "/v1/models", headers=auth).json()["data"][0]["id"]
    job_id = _start_job(server.url, auth, base)
    _wait_job(server.url, auth, job_id, {"running"})

    long: dict[str, Any] = {}
    # Greedy on the random model: no EOS for 8 x 2000 tokens, several seconds of decoding (more than the grace).
    reader = threading.Thread(target=_stream_lines, args=(server.url, auth, {
        "model": base, "prompt": "hi", "max_tokens": 2000, "n": 8, "temperature": 0}, long))
    reader.start()
    deadline = time.monotonic() + 30
    while "status" not in long:
        assert time.monotonic() < deadline and reader.is_alive(), long
        time.sleep(0.05)
    short: dict[str, httpx.Response] = {}
    shorter = threading.Thread(target=lambda: short.setdefault("r", httpx.post(
        server.url + "/v1/completions", headers=auth, timeout=30,
        json={"model": base, "prompt": "hello", "max_tokens": 200, "temperature": 0})))
    shorter.start()
    # Time to be accepted (a connection the server never accepted would be refused after the signal): the
    # request is then decoding in the long one's batch, a few hundred ms, when the signal comes.
    time.sleep(0.3)
    server.terminate()
    signalled = time.monotonic()

    time.sleep(0.5)  # uvicorn notices the signal within 0.1 s and closes its listening socket
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/healthz", timeout=5)
    shorter.join(30)
    assert short["r"].status_code == 200, short["r"].text
    assert len(short["r"].json()["choices"][0]["text"]) > 0
    reader.join(60)
    # The long stream ran past the grace period and was ended by the engine: an error chunk, then [DONE].
    assert long.get("status") == 200 and "error" not in long, long.get("error")
    assert long["lines"][-1] == "data: [DONE]"
    err = json.loads(long["lines"][-2].removeprefix("data: "))
    assert SHUTDOWN_MESSAGE in err["error"]["message"]
    assert GRACE_S - 0.2 <= long["ended"] - signalled <= GRACE_S + SHUTDOWN_FLUSH_S
    assert server.proc.wait(GRACE_S + SHUTDOWN_FLUSH_S + 30) == 0
    exited_after = time.monotonic() - signalled
    assert exited_after < GRACE_S + SHUTDOWN_FLUSH_S + 15, exited_after  # + the lifespan's engine/worker stop
    print(f"stream ended {long['ended'] - signalled:.2f} s and the process {exited_after:.2f} s after SIGTERM")

    # The in-process training job was handed back (read in the database: no server runs now) ...
    db = sa.create_engine(settings["PREFIXSERVE_DATABASE_URL"])
    try:
        with Session(db) as s:
            job_row = s.get(TrainingJob, job_id)
            assert job_row is not None and (job_row.status, job_row.attempts) == ("queued", 1)
    finally:
        db.dispose()
    # ... and a new server (its start-up sweep) finishes it.
    successor = _start(servers, tmp_path, settings)
    job = _wait_job(successor.url, auth, job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    r = httpx.post(successor.url + "/v1/completions", headers=auth, timeout=30,
                   json={"model": job["fine_tuned_model"], "prompt": "name: N3 =>", "max_tokens": 4})
    assert r.status_code == 200, r.text
