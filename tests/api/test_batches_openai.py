"""The Batch API end to end with the official `openai` client, on the embedded default app (SQLite, the in-process
runner, the real engine on random:tiny-llama): files.create(purpose="batch"), batches.create / retrieve / list /
cancel, files.content of the output; every answer equals the same request sent to the endpoint."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from openai.types import Batch

from app.config import Settings
from app.main import create_app
from tests.engine.helpers import StepProbe

ADMIN = {"Authorization": "Bearer psk-admin-batches"}
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, OpenAI, str]]:
    settings = Settings(data_dir=Path(tmp_path_factory.mktemp("batches")), model="random:tiny-llama",
                        admin_key=ADMIN["Authorization"].split()[1], job_queue="none", job_heartbeat_s=0.05)
    with TestClient(create_app(settings)) as tc:
        key = tc.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN).json()["api_key"]
        model = tc.app.state.runtime.model.spec.model_id  # type: ignore[attr-defined]
        yield tc, OpenAI(base_url="http://testserver/v1", api_key=key, http_client=tc, max_retries=0), model


def jsonl(url: str, bodies: dict[str, dict[str, Any]]) -> io.BytesIO:
    lines = [json.dumps({"custom_id": k, "method": "POST", "url": url, "body": b}) for k, b in bodies.items()]
    return io.BytesIO(("\n".join(lines) + "\n").encode())


def wait(client: OpenAI, batch_id: str, done: Callable[[Batch], bool]) -> Batch:
    deadline = time.monotonic() + 60  # turns a hang into a failure; never what is tested
    while not done(batch := client.batches.retrieve(batch_id)):
        assert time.monotonic() < deadline, batch
        time.sleep(0.01)
    return batch


def test_batches_with_the_openai_client(served: tuple[TestClient, OpenAI, str]) -> None:
    _, client, model = served
    completions = {"greedy": {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
                   "seeded": {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0.9, "seed": 5},
                   "too-long": {"model": model, "prompt": PROMPT, "max_tokens": 10**6}}
    chats = {"chat": {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                      "temperature": 0}}
    f = client.files.create(file=("in.jsonl", jsonl("/v1/completions", completions)), purpose="batch")
    g = client.files.create(file=("chat.jsonl", jsonl("/v1/chat/completions", chats)), purpose="batch")
    first = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                                  metadata={"run": "nightly"})
    second = client.batches.create(input_file_id=g.id, endpoint="/v1/chat/completions", completion_window="24h")
    first, second = (wait(client, b.id, lambda b: b.status == "completed") for b in (first, second))
    assert first.request_counts is not None and (first.request_counts.completed, first.request_counts.failed) == (2, 1)
    assert first.metadata == {"run": "nightly"} and first.output_file_id and first.error_file_id

    out = [json.loads(x) for x in client.files.content(first.output_file_id).text.splitlines()]
    for record in out:
        # The endpoint's own answer to the same request, as it came over HTTP (ids and times aside).
        direct = client.completions.with_raw_response.create(**completions[record["custom_id"]]).http_response.json()
        body = record["response"]["body"]
        assert (body["choices"], body["usage"], body["model"]) == (direct["choices"], direct["usage"], direct["model"])
    (error,) = [json.loads(x) for x in client.files.content(first.error_file_id).text.splitlines()]
    assert error["custom_id"] == "too-long" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["code"] == "context_length_exceeded"

    (answer,) = [json.loads(x) for x in client.files.content(second.output_file_id or "").text.splitlines()]
    direct = client.chat.completions.with_raw_response.create(**chats["chat"])  # type: ignore[call-overload]
    assert answer["response"]["body"]["choices"] == direct.http_response.json()["choices"]
    assert [b.id for b in client.batches.list(limit=1)] == [second.id, first.id]  # two pages, newest first


def test_cancel_with_the_openai_client(served: tuple[TestClient, OpenAI, str]) -> None:
    tc, client, model = served
    probe = StepProbe(tc.app.state.runtime.engine)  # type: ignore[attr-defined]
    probe.hold()  # the batch's request stays mid-generation until the cancel is in
    try:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
        f = client.files.create(file=("in.jsonl", jsonl("/v1/completions", {"long": body})), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        assert probe.decoding.wait(60)
        assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    finally:
        probe.release()
    batch = wait(client, batch.id, lambda b: b.status == "cancelled")
    assert batch.request_counts is not None and batch.request_counts.completed == 0 and batch.output_file_id is None
    assert batch.cancelled_at is not None
