"""The local cluster (`scripts/cluster.sh`: 2 API processes, 1 worker, PostgreSQL, Redis, SeaweedFS) on the
random tiny Llama: what one replica changes, the other serves at once.

- a prefix uploaded through replica A is served by replica B (and gives the same text on both);
- a delete through A stops B serving it at once, although B has it in its device pool and Redis holds its
  bytes; a new upload under the same name is served fresh by B;
- a training job created through A runs on the worker, and its prefix is served by B.
- a batch created through A with the official openai client runs once and B reads its output file.

Real processes, real services; every wait is bounded and the cluster is always stopped.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.engine.model import load_model
from prefix_store.codec import encode_native
from tests.engine.helpers import random_prefix

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MODEL = "random:tiny-llama"
PROMPT = "The quick brown fox"
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 30.0
JOB_TIMEOUT_S = 180.0


@dataclass
class Cluster:
    env: dict[str, str]
    a: httpx.Client
    b: httpx.Client
    dir: Path

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env['PREFIXSERVE_ADMIN_KEY']}"}


def _script(command: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "scripts/cluster.sh", command], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        out[key] = " ".join(shlex.split(value))
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    run_dir = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "CLUSTER_DIR": str(run_dir), "CLUSTER_DATA_DIR": str(run_dir / "data"),
           "PREFIXSERVE_MODEL": MODEL, "CLUSTER_REDIS_DB": "13", "CLUSTER_READY_TIMEOUT": str(START_TIMEOUT_S)}
    try:
        started = _script("start", env, START_TIMEOUT_S + 60)
        assert started.returncode == 0, f"cluster start failed:\n{started.stderr[-4000:]}"
        cenv = _read_env(run_dir / "cluster.env")
        url_a, url_b = cenv["CLUSTER_API_URLS"].split()
        with httpx.Client(base_url=url_a, timeout=REQUEST_TIMEOUT_S) as a, \
                httpx.Client(base_url=url_b, timeout=REQUEST_TIMEOUT_S) as b:
            yield Cluster(cenv, a, b, run_dir)
    finally:
        stopped = _script("stop", env, 120)
        assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="module")
def tenant_key(cluster: Cluster) -> str:
    r = cluster.a.post("/admin/tenants", json={"name": "acme"}, headers=cluster.admin)
    assert r.status_code == 201, r.text
    key: str = r.json()["api_key"]
    return key


def _prefix_bytes(tmp_path: Path, seed: int) -> bytes:
    loaded = load_model(MODEL, data_dir=tmp_path)  # the same deterministic random weights as the cluster's
    return encode_native(random_prefix(loaded, 6, seed=seed, scale=2.0))


def _complete(client: httpx.Client, key: str, model: str) -> httpx.Response:
    return client.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})


def _text(client: httpx.Client, key: str, model: str) -> str:
    r = _complete(client, key, model)
    assert r.status_code == 200, r.text
    text: str = r.json()["choices"][0]["text"]
    return text


def _upload(client: httpx.Client, key: str, name: str, data: bytes) -> None:
    r = client.post("/v1/prefixes", headers={"Authorization": f"Bearer {key}"}, data={"name": name},
                    files={"file": ("prefix.safetensors", data, "application/octet-stream")})
    assert r.status_code == 201, r.text


def _base_model(client: httpx.Client, key: str) -> str:
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    model: str = r.json()["data"][0]["id"]
    return model


def _metric(client: httpx.Client, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        total += sum(s.value for s in family.samples if s.name == name)
    return total


def test_prefix_uploaded_through_a_is_served_by_b(cluster: Cluster, tenant_key: str, tmp_path: Path) -> None:
    base = _base_model(cluster.b, tenant_key)
    base_text = _text(cluster.b, tenant_key, base)
    _upload(cluster.a, tenant_key, "poet", _prefix_bytes(tmp_path, seed=1))
    served_b = _text(cluster.b, tenant_key, "poet")
    assert served_b != base_text
    assert _text(cluster.a, tenant_key, "poet") == served_b  # same base, same prefix, greedy: same answer
    assert "poet" in [m["id"] for m in cluster.b.get("/v1/models",
                                                     headers={"Authorization": f"Bearer {tenant_key}"}).json()["data"]]


def test_delete_through_a_stops_b_at_once(cluster: Cluster, tenant_key: str, tmp_path: Path) -> None:
    auth = {"Authorization": f"Bearer {tenant_key}"}
    _upload(cluster.a, tenant_key, "gone", _prefix_bytes(tmp_path, seed=2))
    old_text = _text(cluster.b, tenant_key, "gone")
    assert _text(cluster.b, tenant_key, "gone") == old_text  # a device-pool hit on B now
    held = _metric(cluster.b, "prefixserve_device_pool_entries")
    assert held >= 1 and _metric(cluster.b, "prefixserve_prefix_cache_hits_total") >= 1
    r = cluster.a.delete("/v1/prefixes/gone", headers=auth)
    assert r.status_code == 200, r.text
    # The very next request on B: no stale device-pool or Redis copy is served, for any form of the name.
    for model in ("gone", "gone@1"):
        r = _complete(cluster.b, tenant_key, model)
        assert r.status_code == 404, (model, r.text)
        assert cluster.b.get(f"/v1/models/{model}", headers=auth).status_code == 404
    # B also frees the deleted prefix's device memory (A's pub/sub invalidation; fire-and-forget, so a bounded
    # wait rather than an exact moment).
    deadline = time.monotonic() + 10
    while _metric(cluster.b, "prefixserve_device_pool_entries") != held - 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(cluster.b, "prefixserve_device_pool_entries") == held - 1
    # A new prefix under the same name is served fresh on B, never the deleted one.
    _upload(cluster.a, tenant_key, "gone", _prefix_bytes(tmp_path, seed=3))
    new_text = _text(cluster.b, tenant_key, "gone")
    assert new_text != old_text
    assert _text(cluster.a, tenant_key, "gone") == new_text


def _jsonl(n: int) -> bytes:
    return b"".join(json.dumps({"prompt": f"name: N{i} =>", "completion": f" N{i}."}).encode() + b"\n"
                    for i in range(n))


def test_job_created_through_a_runs_on_the_worker_and_b_serves_it(cluster: Cluster, tenant_key: str) -> None:
    auth = {"Authorization": f"Bearer {tenant_key}"}
    r = cluster.a.post("/v1/files", headers=auth, data={"purpose": "fine-tune"},
                       files={"file": ("train.jsonl", _jsonl(8), "application/jsonl")})
    assert r.status_code == 200, r.text
    r = cluster.a.post("/v1/fine_tuning/jobs", headers=auth, json={
        "model": _base_model(cluster.a, tenant_key), "training_file": r.json()["id"], "suffix": "trained",
        "num_virtual_tokens": 4, "seed": 1, "hyperparameters": {"max_steps": 3, "batch_size": 4}})
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:  # watched through B: the job's state lives in the shared database
        job = cluster.b.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert job["status"] == "succeeded", job
    assert job_id in (cluster.dir / "worker.log").read_text()  # the worker process trained it, not an API
    model = job["fine_tuned_model"]
    assert model and model.startswith("trained")
    assert _complete(cluster.b, tenant_key, model).status_code == 200
    assert _text(cluster.b, tenant_key, model) == _text(cluster.a, tenant_key, model)


def test_a_batch_created_through_a_with_the_openai_client_runs_once_and_b_reads_its_output(
        cluster: Cluster, tenant_key: str, tmp_path: Path) -> None:
    """The official client's Batch API calls against the cluster: created through A, run by one replica's runner
    (a claim in the shared database), read back through B; each answer is what the endpoint gives directly."""
    from openai import OpenAI

    _upload(cluster.a, tenant_key, "batched", _prefix_bytes(tmp_path, seed=4))
    models = ["batched", _base_model(cluster.a, tenant_key)]
    bodies = [{"model": models[i % 2], "prompt": f"{PROMPT} {i}", "max_tokens": 6, "temperature": 0}
              for i in range(6)]
    lines = b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                 "body": body}).encode() + b"\n" for i, body in enumerate(bodies))
    via_a = OpenAI(base_url=f"{str(cluster.a.base_url).rstrip('/')}/v1", api_key=tenant_key, max_retries=0)
    via_b = OpenAI(base_url=f"{str(cluster.b.base_url).rstrip('/')}/v1", api_key=tenant_key, max_retries=0)
    batch_input = via_a.files.create(file=("batch.jsonl", lines), purpose="batch")
    batch = via_a.batches.create(input_file_id=batch_input.id, endpoint="/v1/completions",
                                 completion_window="24h")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (batch := via_b.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None and (batch.request_counts.completed, batch.request_counts.failed) == (6, 0)
    assert batch.output_file_id is not None
    out = {r["custom_id"]: r["response"] for r in map(json.loads, via_b.files.content(batch.output_file_id).text
                                                      .splitlines())}
    assert sorted(out) == [f"r{i}" for i in range(6)]  # each request answered once
    for i, body in enumerate(bodies):
        direct = cluster.b.post("/v1/completions", headers={"Authorization": f"Bearer {tenant_key}"}, json=body)
        assert out[f"r{i}"]["status_code"] == 200
        assert out[f"r{i}"]["body"]["choices"][0]["text"] == direct.json()["choices"][0]["text"], i
