"""End to end through the HTTP API with the embedded default's in-process worker (random:tiny-llama, SQLite):
a fine-tuning job and a personalization job are trained by the worker thread and served at once."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.jobs.data_defaults import data_defaults
from app.main import create_app
from tests.training.job_support import RECORDS

ADMIN = "adm-jobs-api"
HYPER = {"max_steps": 8, "batch_size": 4, "checkpoint_every": 4}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path, model="random:tiny-llama", admin_key=ADMIN, job_heartbeat_s=0.2)
    with TestClient(create_app(settings)) as c:
        yield c


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _tenant(client: TestClient) -> str:
    r = client.post("/admin/tenants", headers=_auth(ADMIN), json={"name": "acme"})
    assert r.status_code in (200, 201), r.text
    return str(r.json()["api_key"])


def _wait_done(client: TestClient, key: str, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=_auth(key)).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout} s"
        time.sleep(0.1)


def _complete(client: TestClient, key: str, model: str) -> tuple[str, list[float]]:
    """The greedy text and its tokens' log-probabilities: the random model's bytes often decode to no text at all,
    so a prefix that changes the model's output is told apart by the distribution, not only by the text."""
    r = client.post("/v1/completions", headers=_auth(key),
                    json={"model": model, "prompt": "item 4:", "max_tokens": 6, "temperature": 0, "logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return str(choice["text"]), [float(x) for x in choice["logprobs"]["token_logprobs"]]


def test_fine_tuning_job_runs_on_the_in_process_worker_and_is_served(client: TestClient) -> None:
    key = _tenant(client)
    data = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
    r = client.post("/v1/files", headers=_auth(key), files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    base = client.get("/v1/models", headers=_auth(key)).json()["data"][0]["id"]
    r = client.post("/v1/fine_tuning/jobs", headers=_auth(key), json={
        "model": base, "training_file": r.json()["id"], "suffix": "tuned", "hyperparameters": HYPER,
        "prefix_init": "random",  # a few steps from a random start surely change the tiny model's output
        "num_virtual_tokens": 4})
    assert r.status_code == 200, r.text

    job = _wait_done(client, key, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["fine_tuned_model"] == "tuned@1" and job["trained_tokens"] > 0
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=_auth(key),
                        params={"limit": 100}).json()["data"]
    assert events[0]["message"].startswith("job succeeded: published tuned@1")
    assert any(e["type"] == "metrics" and e["data"]["step"] == 8 for e in events)
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=_auth(key)).json()["data"]
    assert sorted(c["step_number"] for c in checkpoints) == [4, 8]
    assert _complete(client, key, "tuned@1") != _complete(client, key, base)


def test_personalization_job_is_served_as_the_user(client: TestClient) -> None:
    key = _tenant(client)
    r = client.post("/v1/users/alice/examples", headers=_auth(key), json={"examples": RECORDS[:8]})
    assert r.status_code == 201, r.text
    r = client.post("/v1/users/alice/personalize", headers=_auth(key),
                    json={"hyperparameters": HYPER, "num_virtual_tokens": 4, "prefix_init": "random"})
    assert r.status_code == 200, r.text

    job = _wait_done(client, key, r.json()["id"])
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == "user:alice@1", job
    user = client.get("/v1/users/alice", headers=_auth(key)).json()
    assert user["personal_prefix"]["version"] == 1 and user["example_count"] == 8
    base = client.get("/v1/models", headers=_auth(key)).json()["data"][0]["id"]
    assert _complete(client, key, "user:alice") != _complete(client, key, base)

    # Re-personalizing warm-starts from the current personal prefix and replaces what `user:alice` serves.
    r = client.post("/v1/users/alice/personalize", headers=_auth(key), json={"hyperparameters": HYPER})
    job = _wait_done(client, key, r.json()["id"])
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == "user:alice@2", job
    assert job["prefix_options"].get("warm_start") == "user:alice@1"
    assert client.get("/v1/users/alice", headers=_auth(key)).json()["personal_prefix"]["version"] == 2


def test_personalization_with_the_defaults_from_a_few_examples_is_served(client: TestClient) -> None:
    """No hyperparameters at all: the few-example defaults (app/jobs/data_defaults.py) are chosen, recorded on the
    job, trained for their whole length, and the personal prefix serves."""
    key = _tenant(client)
    r = client.post("/v1/users/ann/examples", headers=_auth(key), json={"examples": RECORDS[:6]})
    assert r.status_code == 201, r.text
    r = client.post("/v1/users/ann/personalize", headers=_auth(key), json={"seed": 3})
    assert r.status_code == 200, r.text
    chosen = data_defaults(6)
    hp = r.json()["hyperparameters"]
    assert (hp["batch_size"], hp["max_steps"], hp["learning_rate"]) == (
        chosen.batch_size, chosen.max_steps, chosen.learning_rate)

    job = _wait_done(client, key, r.json()["id"])
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == "user:ann@1", job
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=_auth(key),
                        params={"limit": 100}).json()["data"]
    assert any(e["type"] == "metrics" and e["data"]["step"] == chosen.max_steps for e in events)
    base = client.get("/v1/models", headers=_auth(key)).json()["data"][0]["id"]
    assert _complete(client, key, "user:ann") != _complete(client, key, base)


def test_serving_while_the_in_process_worker_trains_is_unchanged_and_cancel_stops_it(client: TestClient) -> None:
    key = _tenant(client)
    base = client.get("/v1/models", headers=_auth(key)).json()["data"][0]["id"]
    before = _complete(client, key, base)
    r = client.post("/v1/users/bob/examples", headers=_auth(key), json={"examples": RECORDS})
    assert r.status_code == 201, r.text
    r = client.post("/v1/users/bob/personalize", headers=_auth(key),
                    json={"hyperparameters": {"max_steps": 1_000_000, "batch_size": 4}, "num_virtual_tokens": 4})
    job_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while not any(e.get("type") == "metrics" for e in client.get(
            f"/v1/fine_tuning/jobs/{job_id}/events", headers=_auth(key)).json()["data"]):
        assert time.monotonic() < deadline, "no training step within 60 s"
        time.sleep(0.1)

    # The engine thread serves with the same frozen model the worker thread is training against.
    assert [_complete(client, key, base) for _ in range(3)] == [before] * 3

    r = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=_auth(key))
    assert r.status_code == 200, r.text
    job = _wait_done(client, key, job_id, timeout=60)
    assert job["status"] == "cancelled" and job["fine_tuned_model"] is None
    assert client.get("/v1/users/bob", headers=_auth(key)).json()["personal_prefix"] is None
