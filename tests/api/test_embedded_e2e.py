"""End to end over HTTP on the REAL embedded SmolLM2-135M-Instruct (slow: the GGUF is converted once, ~35 s).

The base model answers a factual chat question; a real HF PEFT prefix-tuning adapter uploaded through the
prefix API gives exactly the greedy tokens of `PeftModel.forward` (full recompute each step); streaming chat
with the prefix ends in `[DONE]`; a prefix trained through the fine-tuning API is served and has learnt its task.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PrefixTuningConfig, get_peft_model

from app.config import Settings
from app.engine.model import LoadedModel, load_model
from app.engine.sources import EMBEDDED_MODEL
from app.main import create_app
from tests.api.sse import sse_payloads
from tests.conftest import shared_models

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": "Bearer adm"}
PREFIX = "peft-poet"
MAX_TOKENS = 8


@dataclass
class Env:
    client: TestClient
    data_dir: Path
    headers: dict[str, str]
    base: str


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, embedded_data_dir: Path) -> Iterator[Env]:
    data_dir = tmp_path_factory.mktemp("embedded-api")
    shared_models(data_dir, embedded_data_dir)  # the GGUF is converted once per session, not per module
    with TestClient(create_app(Settings(data_dir=data_dir, admin_key="adm"))) as client:
        r = client.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN)
        assert r.status_code == 201, r.text
        headers = {"Authorization": f"Bearer {r.json()['api_key']}"}
        base = client.get("/v1/models", headers=headers).json()["data"][0]["id"]
        yield Env(client, data_dir, headers, base)


@pytest.fixture(scope="module")
def adapter(env: Env) -> tuple[LoadedModel, object]:
    """A separate copy of the model wrapped in a random PEFT prefix-tuning adapter, uploaded as PREFIX."""
    loaded = load_model(EMBEDDED_MODEL, data_dir=env.data_dir)  # reads the cache the app converted
    pm = get_peft_model(loaded.model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    torch.manual_seed(1234)
    with torch.no_grad():
        for param in pm.prompt_encoder["default"].parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    pm.eval()
    out = env.data_dir / "adapter"
    pm.save_pretrained(str(out))
    files = [("files", (n, (out / n).read_bytes(), "application/octet-stream"))
             for n in ("adapter_config.json", "adapter_model.safetensors")]
    r = env.client.post("/v1/prefixes", headers=env.headers, data={"name": PREFIX}, files=files)
    assert r.status_code == 201, r.text
    assert r.json()["num_virtual_tokens"] == 8
    return loaded, pm


def _peft_greedy(pm: object, prompt: list[int], steps: int, eos: set[int]) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(steps):
        with torch.inference_mode():
            logits = pm(input_ids=torch.tensor([ids]),  # type: ignore[operator]
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
        tok = int(logits[0, -1].argmax())
        if tok in eos:
            break
        out.append(tok)
        ids.append(tok)
    return out


def test_base_model_knows_paris(env: Env) -> None:
    r = env.client.post("/v1/chat/completions", headers=env.headers, json={
        "model": env.base, "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_peft_prefix_matches_peft_forward(env: Env, adapter: tuple[LoadedModel, object]) -> None:
    loaded, pm = adapter
    prompt = loaded.tokenizer.encode("Once upon a time, in a quiet village,")
    expected = _peft_greedy(pm, prompt, MAX_TOKENS, set(loaded.eos_token_ids))
    base = _peft_greedy(loaded.model, prompt, MAX_TOKENS, set(loaded.eos_token_ids))
    assert expected != base  # the adapter matters

    r = env.client.post("/v1/completions", headers=env.headers, json={
        "model": PREFIX, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == len(expected)
    choice = body["choices"][0]
    assert choice["text"] == loaded.tokenizer.decode(expected)
    assert choice["logprobs"]["tokens"] == [loaded.tokenizer.decode([t]) for t in expected]


def test_streaming_chat_with_prefix(env: Env, adapter: tuple[LoadedModel, object]) -> None:
    r = env.client.post("/v1/chat/completions", headers=env.headers, json={
        "model": PREFIX, "temperature": 0, "max_tokens": MAX_TOKENS, "stream": True,
        "messages": [{"role": "user", "content": "Tell me a story."}]})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert chunks and all(c["object"] == "chat.completion.chunk" and c["model"] == PREFIX for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text


def test_a_prefix_trained_through_the_api_is_served(env: Env) -> None:
    """Training end to end: a small prefix trained on the embedded model through the Files and Fine-tuning APIs
    (the embedded server's in-process worker) is served at once and has learnt its task."""
    items = ["lamp", "chair", "kettle", "rope", "tent", "boots", "map", "torch", "bucket", "ladder", "saw", "net"]
    lines = [json.dumps({"prompt": f"Order #{i}: one {item}.\nReply:", "completion": " ACCEPTED"})
             for i, item in enumerate(items)]
    r = env.client.post("/v1/files", headers=env.headers, data={"purpose": "fine-tune"},
                        files={"file": ("orders.jsonl", "\n".join(lines).encode(), "application/jsonl")})
    assert r.status_code == 200, r.text
    r = env.client.post("/v1/fine_tuning/jobs", headers=env.headers, json={
        "model": env.base, "training_file": r.json()["id"], "suffix": "orders", "seed": 0,
        "num_virtual_tokens": 8, "hyperparameters": {"max_steps": 20, "batch_size": 4}})
    assert r.status_code == 200, r.text
    job = r.json()
    deadline = time.monotonic() + 240
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job['status']} after 240 s"
        time.sleep(0.5)
        job = env.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=env.headers).json()
    assert job["status"] == "succeeded", job
    assert job["fine_tuned_model"] == "orders@1"

    prompt = "Order #99: one shovel.\nReply:"  # an item it never saw
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0}
    tuned = env.client.post("/v1/completions", headers=env.headers, json={**body, "model": "orders"})
    base = env.client.post("/v1/completions", headers=env.headers, json={**body, "model": env.base})
    assert tuned.status_code == base.status_code == 200
    assert tuned.json()["choices"][0]["text"].startswith(" ACCEPTED")
    assert not base.json()["choices"][0]["text"].startswith(" ACCEPTED")
