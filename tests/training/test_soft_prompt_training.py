"""Prompt tuning (kind prompt_tuning): the trainer optimizes a soft prompt on the frozen model (the loss falls),
the result serves in the engine with PEFT's greedy tokens for it, and a job through the fine-tuning API trains,
publishes a `prompt_tuning` version and serves it; the options prompt tuning does not take are 400s."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel

from app.config import Settings
from app.engine.sampling import SamplingParams
from app.engine.types import GenerationRequest
from app.jobs.data import tokenize_examples
from app.jobs.types import TrainCallbacks, TrainConfig, TrainEvent
from app.main import create_app
from app.training.trainer import train_prefix
from prefix_store.peft_soft import encode_peft_soft
from prefix_store.types import SoftPrompt
from tests.engine.helpers import collect, make_engine
from tests.training.job_support import RECORDS
from tests.training.test_jobs_api import _auth, _complete, _tenant, _wait_done

STEPS = 8


def test_trained_soft_prompt_lowers_the_loss_and_serves_as_peft_does(tiny_llama, tmp_path: Path) -> None:
    examples = tokenize_examples(RECORDS, tiny_llama.tokenizer, max_tokens=64)
    config = TrainConfig(kind="prompt_tuning", num_virtual_tokens=4, batch_size=4, max_steps=12, learning_rate=3e-2,
                         prefix_init="random", early_stopping_patience=None)
    events: list[TrainEvent] = []
    result = train_prefix(tiny_llama, examples, None, config, callbacks=TrainCallbacks(on_event=events.append))
    losses = [e.train_loss for e in events if e.train_loss is not None]
    assert losses[-1] < losses[0], losses
    soft = result.prefix
    assert isinstance(soft, SoftPrompt) and soft.embeddings.shape == (4, tiny_llama.spec.hidden_size)

    # Exported as PEFT PROMPT_TUNING: PeftModel's greedy tokens are the engine's.
    out = tmp_path / "peft"
    out.mkdir()
    for name, data in encode_peft_soft(soft, spec=tiny_llama.spec, base_model_name_or_path="m").items():
        (out / name).write_bytes(data)
    pm = PeftModel.from_pretrained(tiny_llama.model, str(out)).eval()
    prompt = examples[0].input_ids[:3]
    ids = list(prompt)
    for _ in range(STEPS):
        with torch.inference_mode():
            logits = pm(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
        ids.append(int(logits[0, -1].argmax()))
    engine = make_engine(tiny_llama)
    try:
        params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
        served = asyncio.run(collect(engine, GenerationRequest(prompt, params, prefix=soft)))
    finally:
        engine.stop()
    assert served.tokens == ids[len(prompt):]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path, model="random:tiny-llama", admin_key="adm-jobs-api", job_heartbeat_s=0.2)
    with TestClient(create_app(settings)) as c:
        yield c


def test_prompt_tuning_job_trains_publishes_and_serves(client: TestClient) -> None:
    key = _tenant(client)
    data = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
    file_id = client.post("/v1/files", headers=_auth(key), files={"file": ("t.jsonl", data)},
                          data={"purpose": "fine-tune"}).json()["id"]
    base = client.get("/v1/models", headers=_auth(key)).json()["data"][0]["id"]
    body = {"model": base, "training_file": file_id, "suffix": "soft", "kind": "prompt_tuning",
            "hyperparameters": {"max_steps": 8, "batch_size": 4, "checkpoint_every": 4}, "num_virtual_tokens": 4,
            "prefix_init": "random"}
    r = client.post("/v1/fine_tuning/jobs", headers=_auth(key), json=body)
    assert r.status_code == 200, r.text
    assert r.json()["prefix_options"]["kind"] == "prompt_tuning"
    job = _wait_done(client, key, r.json()["id"])
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == "soft@1", job
    assert client.get("/v1/models/soft", headers=_auth(key)).json()["kind"] == "prompt_tuning"
    assert client.get("/v1/prefixes/soft", headers=_auth(key)).json()["versions"][0]["kind"] == "prompt_tuning"
    assert _complete(client, key, "soft@1") != _complete(client, key, base)

    # What prompt tuning does not take, and unknown kinds: 400s naming the field.
    for changes, param in (({"kind": "lora"}, "kind"), ({"prefix_projection": True}, "prefix_projection"),
                           ({"on_top_of": "soft"}, "on_top_of"), ({"warm_start": "kv"}, "warm_start"),
                           ({"kind": "prefix_tuning", "warm_start": "soft"}, "warm_start")):
        if changes.get("warm_start") == "kv" and client.get("/v1/models/kv", headers=_auth(key)).status_code == 404:
            r = client.post("/v1/fine_tuning/jobs", headers=_auth(key), json={
                **body, "kind": "prefix_tuning", "suffix": "kv"})
            assert _wait_done(client, key, r.json()["id"])["status"] == "succeeded"
        r = client.post("/v1/fine_tuning/jobs", headers=_auth(key), json={**body, **changes})
        assert r.status_code == 400, (changes, r.text)
        assert r.json()["error"]["param"] == param, (changes, r.text)


def test_a_prompt_tuning_run_resumed_from_its_checkpoint_continues_exactly(tiny_llama) -> None:
    """The checkpoint state (module, optimizer, progress with the best soft prompt so far) resumes the same run:
    bit-identical to the run that was never interrupted."""
    examples = tokenize_examples(RECORDS, tiny_llama.tokenizer, max_tokens=64)
    config = TrainConfig(kind="prompt_tuning", num_virtual_tokens=3, batch_size=4, max_steps=6, eval_every=2,
                         checkpoint_every=3, validation_split=0.25, early_stopping_patience=None)
    states: list[object] = []
    full = train_prefix(tiny_llama, examples, None, config,
                        callbacks=TrainCallbacks(on_checkpoint=lambda _s, _p, _m, state: states.append(state)))
    resumed = train_prefix(tiny_llama, examples, None, config, resume=states[0])  # type: ignore[arg-type]
    assert isinstance(full.prefix, SoftPrompt) and isinstance(resumed.prefix, SoftPrompt)
    assert torch.equal(full.prefix.embeddings, resumed.prefix.embeddings)
    assert full.best_val_loss == resumed.best_val_loss and full.best_val_loss is not None
