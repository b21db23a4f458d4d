"""Training a prefix on top of a frozen base (`on_top_of`): served as the stack base+prefix, it gives the trainer's
logits and greedy tokens; the job pins the base, trains behind it and publishes the record; over HTTP the job
shows it, and serving the prefix behind another base version is a 409 unless the request allows it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from app.catalog.refs import find_version
from app.catalog.versions import publish_version
from app.engine.batch import Batch, NewRow
from app.engine.factory import build_engine
from app.engine.runner import ModelRunner, geometry_of
from app.engine.sampling import SamplerState, SamplingParams
from app.engine.types import GenerationRequest
from app.jobs.data_defaults import FEW_STACKED_NUM_VIRTUAL_TOKENS, FEW_STACKED_STEPS
from app.jobs.job_config import job_columns
from app.jobs.types import TrainConfig
from app.training.forward import PrefixForward, behind, collate
from app.training.jobs import _default_train, execute_job
from app.training.trainer import train_prefix
from prefix_store.codec import decode_native, encode_native
from prefix_store.ref import BaseRef
from prefix_store.stack import concat_prefixes
from tests.api.fixtures_admin import Api, bearer, make_api, native_bytes
from tests.engine.helpers import collect, random_prefix
from tests.training.helpers import evaluate, example, toy_task
from tests.training.job_support import FAST, RECORDS, JobEnv, jsonl

PROMPTS = [[40, 41, 42, 7], [50, 7], [45, 46, 47, 48, 49, 50, 7]]
CONFIG = TrainConfig(num_virtual_tokens=4, max_steps=6, batch_size=4, learning_rate=3e-2, seed=2,
                     prefix_init="random")


def trainer_greedy(loaded, base, trained, prompt: list[int], steps: int) -> list[int]:
    """The trainer's own greedy continuation: its forward behind base+prefix, one token at a time."""
    keys, values = behind(base, trained.keys, trained.values)
    ids, pad = list(prompt), int(loaded.tokenizer.pad_token_id)
    for _ in range(steps):
        batch = collate([example(ids, [0])], num_virtual_tokens=keys.shape[2], pad_token_id=pad, device=loaded.device)
        with torch.no_grad():
            ids.append(int(PrefixForward(loaded.model).target_logits(keys, values, batch)[0].argmax()))
    return ids[len(prompt):]


async def test_a_prefix_trained_on_top_serves_the_trainers_logits_and_tokens(tiny, monkeypatch) -> None:
    base = random_prefix(tiny, 3, seed=7)
    before = base.keys.clone()
    val = toy_task(16)[12:]
    seen: list[tuple[int, bool, int]] = []  # every training and validation forward: KV length, base in front, mask
    loss_sum = PrefixForward.loss_sum

    def spy(self, keys, values, batch):  # type: ignore[no-untyped-def]
        seen.append((int(keys.shape[2]), torch.equal(keys[:, :, :3].detach(), base.keys),
                     int(batch.attention_mask.shape[1] - batch.input_ids.shape[1])))
        return loss_sum(self, keys, values, batch)

    monkeypatch.setattr(PrefixForward, "loss_sum", spy)
    result = train_prefix(tiny, toy_task(12), val, CONFIG, base=base)
    monkeypatch.undo()
    assert len(seen) == CONFIG.max_steps + 1 and set(seen) == {(3 + 4, True, 3 + 4)}
    trained = result.prefix
    assert torch.equal(base.keys, before) and base.keys.grad is None  # frozen
    stack = concat_prefixes([base, trained])  # what the resolver serves for `base+trained`
    # What the trainer measured is what the served layout gives (one prefix of Pb + P tokens, prompt after it).
    assert result.best_val_loss is not None
    assert abs(evaluate(tiny, stack, val)[0] - result.best_val_loss) <= 1e-4

    # Next-token logits in a left-padded batch next to other rows == the trainer's, within 1e-4.
    other = random_prefix(tiny, 9, seed=4)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    rows = [NewRow(str(i), p, x, SamplerState.create(greedy, tiny.device))
            for i, (p, x) in enumerate(zip([*PROMPTS, [60, 61]], [stack, other, stack, None], strict=True))]
    batch = Batch.from_requests(rows, geometry=geometry_of(tiny.model, tiny.device, tiny.dtype),
                                pad_token_id=int(tiny.tokenizer.pad_token_id))
    served = ModelRunner(tiny.model).forward(batch)
    train_batch = collate([example(PROMPTS[i], [0]) for i in (0, 2)], num_virtual_tokens=3 + 4,
                          pad_token_id=int(tiny.tokenizer.pad_token_id), device=tiny.device)
    with torch.no_grad():
        trainer_logits = PrefixForward(tiny.model).target_logits(*behind(base, trained.keys, trained.values),
                                                                 train_batch)
    torch.testing.assert_close(served[[0, 2]], trainer_logits, rtol=0, atol=1e-4)

    # Greedy tokens through the running engine == the trainer's greedy continuation.
    engine = build_engine(tiny, packed_linears=False)  # the session's model is shared: leave its layers as they are
    engine.start()
    try:
        for prompt in PROMPTS:
            got = await collect(engine, GenerationRequest(prompt_ids=prompt, prefix=stack, sampling=greedy))
            assert got.tokens == trainer_greedy(tiny, base, trained, prompt, 6)
    finally:
        engine.stop()
    # the base matters: trained without it (same seed and data), the prefix comes out different
    alone = train_prefix(tiny, toy_task(12), None, CONFIG).prefix
    assert not torch.allclose(alone.keys, trained.keys)


def test_a_job_on_top_of_a_version_trains_behind_it_and_records_it(sqlite_env: JobEnv) -> None:
    env = sqlite_env
    base_kv = random_prefix(env.loaded, 3, seed=9)
    with env.sessions() as s:
        prefix, row = publish_version(session=s, blobs=env.blobs, tenant_id=env.tenant_id, name="support-bot",
                                      native=encode_native(base_kv),
                                      values={"num_virtual_tokens": 3, "source_format": "native",
                                              "base_model_fingerprint": env.loaded.spec.fingerprint})
        base = BaseRef(prefix.id, "support-bot", row.version)
    seen: list[Any] = []

    def train(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("base"))
        return _default_train(*args, **kwargs)

    hyper, options = job_columns(FAST, on_top_of=[base])
    job_id = _add_job(env, options, hyper)
    assert execute_job(job_id, ctx=env.ctx(train=train)) == "succeeded"
    assert torch.equal(seen[0].keys, base_kv.keys) and torch.equal(seen[0].values, base_kv.values)
    with env.sessions() as s:
        published = find_version(s, tenant_id=env.tenant_id, name="tuned", version=None)
    assert published is not None and published.on_top_of == (base,)
    stored = decode_native(env.blobs.get(published.sha256), spec=env.loaded.spec, max_virtual_tokens=256,
                           max_bytes=2**24)
    assert stored.metadata["on_top_of"] == "support-bot@1"

    # The base deleted after the job was created (then made again: another prefix): the job fails, naming it.
    with env.sessions() as s:
        s.delete(s.get(type(prefix), prefix.id))
        s.commit()
        publish_version(session=s, blobs=env.blobs, tenant_id=env.tenant_id, name="support-bot",
                        native=encode_native(base_kv), values={"num_virtual_tokens": 3, "source_format": "native",
                                                               "base_model_fingerprint": env.loaded.spec.fingerprint})
    again = _add_job(env, options, hyper, name="tuned2")
    assert execute_job(again, ctx=env.ctx()) == "failed"
    error = env.job(again).error
    assert error is not None and error["code"] == "base_prefix_not_found" and "support-bot@1" in error["message"]


def _add_job(env: JobEnv, options: dict[str, Any], hyper: dict[str, Any], name: str = "tuned") -> str:
    from app.db.models import TrainingJob

    file_id = env.add_file(jsonl(RECORDS))
    with env.sessions() as s:
        job = TrainingJob(tenant_id=env.tenant_id, status="queued", model=env.loaded.spec.model_id,
                          training_file_id=file_id, prefix_name=name, hyperparameters=hyper, options=options)
        s.add(job)
        s.commit()
        return job.id


# ---- over HTTP, with the in-process worker -------------------------------------------------------------------
@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path, job_heartbeat_s=0.2, max_stack_virtual_tokens=12)


def _wait_done(api: Api, key: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120  # only turns a hang into a failure
    while True:
        job: dict[str, Any] = api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=bearer(key)).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_training_on_top_over_http_pins_the_base_and_serving_checks_it(api: Api) -> None:
    _, key = api.tenant("acme")
    for seed in (1, 2):  # support-bot@1 and @2
        assert api.upload(key, "support-bot", native_bytes(api.spec, 3, seed=seed)).status_code == 201
    r = api.client.post("/v1/files", headers=bearer(key), data={"purpose": "fine-tune"},
                        files={"file": ("t.jsonl", jsonl(RECORDS))})
    body = {"model": api.spec.model_id, "training_file": r.json()["id"], "suffix": "tuned", "num_virtual_tokens": 4,
            "hyperparameters": {"max_steps": 4, "batch_size": 4}, "prefix_init": "random"}

    def create(**extra: Any) -> Any:
        return api.client.post("/v1/fine_tuning/jobs", headers=bearer(key), json={**body, **extra})

    for extra, param in (({"on_top_of": "nope"}, "on_top_of"), ({"on_top_of": api.spec.model_id}, "on_top_of"),
                         ({"on_top_of": "support-bot", "num_virtual_tokens": 10}, "num_virtual_tokens")):
        refused = create(**extra)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
    job = create(on_top_of="support-bot@1").json()
    assert job["on_top_of"] == "support-bot@1"
    assert api.client.post("/v1/users/ann/examples", headers=bearer(key), json={"examples": RECORDS[:4]}).is_success
    personal = api.client.post("/v1/users/ann/personalize", headers=bearer(key), json={
        "on_top_of": "support-bot", "num_virtual_tokens": 4, "hyperparameters": {"max_steps": 2}}).json()
    assert personal["on_top_of"] == "support-bot@2"  # a name without a version: pinned to its newest at creation
    # No hyperparameters, a few examples, on top of a base: the stacked few-example defaults, shown on the job, with
    # the prefix cut to what the server's stack limit leaves after the base (a default is never a 400).
    assert api.client.post("/v1/users/bea/examples", headers=bearer(key), json={"examples": RECORDS[:4]}).is_success
    auto = api.client.post("/v1/users/bea/personalize", headers=bearer(key), json={"on_top_of": "support-bot"}).json()
    room = 12 - 3  # the fixture's max_stack_virtual_tokens, less the base's 3
    assert room < FEW_STACKED_NUM_VIRTUAL_TOKENS
    assert (auto["prefix_options"]["num_virtual_tokens"], auto["hyperparameters"]["max_steps"]) == (
        room, FEW_STACKED_STEPS)
    api.client.post(f"/v1/fine_tuning/jobs/{auto['id']}/cancel", headers=bearer(key))
    assert _wait_done(api, key, job["id"])["status"] == "succeeded"
    assert _wait_done(api, key, personal["id"])["status"] == "succeeded"
    assert _wait_done(api, key, auto["id"])["status"] in ("cancelled", "succeeded")

    def complete(model: str, **extra: Any) -> Any:
        return api.client.post("/v1/completions", headers=bearer(key), json={
            "model": model, "prompt": "item 4:", "max_tokens": 4, "temperature": 0, **extra})

    assert complete("support-bot@1+tuned").status_code == 200
    assert complete("support-bot+user:ann").status_code == 200
    for model, other in (("support-bot+tuned", "support-bot@2"), ("tuned", "nothing"),
                         ("support-bot@1+user:ann", "support-bot@1")):
        r = complete(model)
        assert r.status_code == 409 and r.json()["error"]["code"] == "base_prefix_mismatch", r.text
        assert f"puts {other} in front" in r.json()["error"]["message"]
        assert complete(model, allow_base_mismatch=True).status_code == 200
    card = api.client.get("/v1/models/support-bot@1+tuned", headers=bearer(key)).json()
    assert [p["on_top_of"] for p in card["prefixes"]] == [None, "support-bot@1"]
