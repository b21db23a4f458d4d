"""Fine-tuning jobs API on the real app (SQLite and PostgreSQL), no worker: creation validates everything (bad
input → 4xx naming the field or line, nothing stored) and queues the job; list/get/cancel/events (JSON and
SSE)/checkpoints show what a worker writes; the official openai client parses every object."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import openai
import pytest
import sqlalchemy as sa

from app.db.models import File, JobCheckpoint, JobEvent, Prefix, PrefixVersion, TrainingJob, utcnow
from app.jobs.data_defaults import data_defaults
from app.jobs.job_config import config_from_job
from app.jobs.types import TrainConfig
from app.services import job_events
from tests.api.fixtures_admin import Api, bearer, native_bytes
from tests.api.fixtures_training import (  # noqa: F401
    CONTEXT,
    create_job,
    file_id,
    jsonl,
    pc,
    queue_of,
    rows,
    set_status,
    train_api_fixture,
    upload_file,
)
from tests.api.sse import sse_payloads as parse_sse


def job_row(api: Api, job_id: str) -> TrainingJob:
    with api.runtime.sessions() as s:
        job = s.get(TrainingJob, job_id)
        assert job is not None
        return job


def add_event(api: Api, job_id: str, message: str, data: dict[str, Any] | None = None) -> str:
    with api.runtime.sessions() as s:
        e = JobEvent(job_id=job_id, level="info", message=message, data=data)
        s.add(e)
        s.commit()
        return e.id


def test_create_queues_a_validated_job(train_api: Api) -> None:
    api = train_api
    tenant_id, key = api.tenant("acme")
    train, val = file_id(api, key, 6), file_id(api, key, 2)
    r = create_job(api, key, training_file=train, validation_file=val, suffix="poet", seed=7, num_virtual_tokens=8,
                   hyperparameters={"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5,
                                    "checkpoint_every": 5},
                   early_stopping_patience=0, metadata={"team": "nlp"})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job"
    assert (job["status"], job["model"], job["suffix"], job["seed"]) == ("queued", api.spec.model_id, "poet", 7)
    assert (job["training_file"], job["validation_file"], job["organization_id"]) == (train, val, tenant_id)
    assert job["fine_tuned_model"] is None and job["finished_at"] is None and job["error"] is None
    hp = job["hyperparameters"]
    few = data_defaults(6)  # what `auto` and the multiplier mean for a 6-example file
    assert (hp["n_epochs"], hp["batch_size"], hp["learning_rate_multiplier"]) == (2, few.batch_size, 0.5)
    assert hp["learning_rate"] == pytest.approx(few.learning_rate * 0.5) and hp["checkpoint_every"] == 5
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": hp}}
    assert job["prefix_options"]["num_virtual_tokens"] == 8 and job["prefix_options"]["warm_start"] is None
    assert job["metadata"] == {"team": "nlp"} and job["result_files"] == [] and job["user"] is None
    assert queue_of(api).enqueued == [job["id"]]
    # The worker rebuilds exactly the requested configuration from the row.
    assert config_from_job(job_row(api, job["id"])) == TrainConfig(
        num_virtual_tokens=8, learning_rate=hp["learning_rate"], batch_size=few.batch_size, n_epochs=2, seed=7,
        early_stopping_patience=None,
        checkpoint_every=5)
    events = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=bearer(key)).json()["data"]
    assert events[0]["message"].startswith("Validated 6 training examples")
    assert "2 validation examples; job queued" in events[0]["message"]
    assert events[1]["message"] == "Validating training data"
    assert api.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=bearer(key)).json() == job


def test_defaults_a_generated_suffix_and_a_recorded_seed(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    job = create_job(api, key, training_file=file_id(api, key)).json()
    assert job["suffix"].startswith("ft-") and isinstance(job["seed"], int)
    assert job["hyperparameters"]["n_epochs"] == "auto"
    assert config_from_job(job_row(api, job["id"])).seed == job["seed"]


def test_list_newest_first_with_pagination(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    train = file_id(api, key)
    ids = [create_job(api, key, training_file=train, suffix=f"p{i}").json()["id"] for i in range(3)]
    listed = api.client.get("/v1/fine_tuning/jobs", headers=bearer(key)).json()
    assert [j["id"] for j in listed["data"]] == ids[::-1] and listed["has_more"] is False
    page = api.client.get("/v1/fine_tuning/jobs?limit=2", headers=bearer(key)).json()
    assert [j["id"] for j in page["data"]] == ids[:0:-1] and page["has_more"] is True
    rest = api.client.get(f"/v1/fine_tuning/jobs?limit=2&after={ids[1]}", headers=bearer(key)).json()
    assert [j["id"] for j in rest["data"]] == ids[:1] and rest["has_more"] is False


BAD_REQUESTS: list[tuple[dict[str, Any], int, str | None, str]] = [
    ({"model": "gpt-4o"}, 404, "model", "gpt-4o"),
    ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs", "greater than or equal to 1"),
    ({"hyperparameters": {"n_epochs": "3"}}, 400, "hyperparameters.n_epochs", "valid integer"),
    ({"hyperparameters": {"batch_size": 100_000}}, 400, "hyperparameters.batch_size", "less than or equal"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, 400, "hyperparameters.learning_rate_multiplier",
     "greater than 0"),
    ({"hyperparameters": {"learning_rate": 0.1, "learning_rate_multiplier": 2}}, 400, "hyperparameters", "not both"),
    ({"hyperparameters": {"n_epoch": 3}}, 400, "hyperparameters.n_epoch", "is not supported"),
    ({"hyperparameters": {"warmup_ratio": 1.5}}, 400, "hyperparameters.warmup_ratio", "less than 1"),
    ({"num_virtual_tokens": 0}, 400, "num_virtual_tokens", "greater than or equal to 1"),
    ({"num_virtual_tokens": 300}, 400, "num_virtual_tokens", "limit of 256"),
    ({"seed": -1}, 400, "seed", "greater than or equal to 0"),
    ({"validation_split": 0.9}, 400, "validation_split", "less than or equal to 0.5"),
    ({"encoder_hidden_size": 64}, 400, "encoder_hidden_size", "prefix_projection"),
    ({"method": {"type": "dpo"}}, 400, None, "supervised"),
    ({"suffix": "Bad Name"}, 400, "suffix", "invalid prefix name"),
    ({"suffix": "user:bob"}, 400, "suffix", "reserved"),
    ({"training_file": "file-missing"}, 400, "training_file", "no file"),
    ({"training_file": "file-\x00"}, 400, "training_file", "no file"),
    ({"validation_file": "file-missing"}, 400, "validation_file", "no file"),
    ({"warm_start": "nothing"}, 400, "warm_start", "no prefix 'nothing'"),
    ({"warm_start": "user:bob"}, 400, "warm_start", "reserved"),
    ({"warm_start": "base@0"}, 400, "warm_start", "invalid version '0'"),  # the prefix API's parser and answer
    ({"warm_start": "base@abc"}, 400, "warm_start", "invalid version 'abc'"),
]


@pytest.mark.parametrize(("change", "status", "param", "fragment"), BAD_REQUESTS)
def test_bad_requests_name_the_field_and_store_nothing(train_api: Api, change: dict[str, Any], status: int,
                                                       param: str | None, fragment: str) -> None:
    api = train_api
    _, key = api.tenant("acme")
    r = create_job(api, key, **{"training_file": file_id(api, key), **change})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"]
    assert rows(api, TrainingJob) == 0 and rows(api, JobEvent) == 0 and queue_of(api).enqueued == []


def test_examples_must_fit_the_context_minus_the_prefix(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    # Byte tokens: prompt + completion + EOS. This one is exactly CONTEXT - 8 tokens long.
    fits_8 = {"prompt": "p" * (CONTEXT - 8 - 3), "completion": "ab"}
    train = upload_file(api, key, jsonl([pc(0), fits_8])).json()["id"]
    assert create_job(api, key, training_file=train, num_virtual_tokens=8).status_code == 200
    r = create_job(api, key, training_file=train, num_virtual_tokens=9, suffix="other")
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "training_file" and err["code"] == "invalid_training_data"
    assert err["message"] == (f"training_file {train}, line 2: the example has {CONTEXT - 8} tokens; at most "
                              f"{CONTEXT - 9} fit (the model's context length minus the prefix's virtual tokens)")
    val = upload_file(api, key, jsonl([fits_8])).json()["id"]
    r = create_job(api, key, training_file=file_id(api, key), validation_file=val, suffix="third")
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_file"
    assert f"validation_file {val}, line 1: the example has" in r.json()["error"]["message"]
    r = create_job(api, key, training_file=train, validation_file=val, validation_split=0.2, suffix="fourth")
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_split"
    assert rows(api, TrainingJob) == 1 and len(queue_of(api).enqueued) == 1


def test_suffix_in_use_by_an_unfinished_job_is_a_conflict(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    train = file_id(api, key)
    # An uploaded prefix of that name is fine: training adds its next version.
    assert api.upload(key, "poet", native_bytes(api.spec)).status_code == 201
    first = create_job(api, key, training_file=train, suffix="poet").json()
    r = create_job(api, key, training_file=train, suffix="poet")
    assert r.status_code == 409 and r.json()["error"]["code"] == "suffix_in_use"
    assert first["id"] in r.json()["error"]["message"]
    set_status(api, first["id"], "running")
    assert create_job(api, key, training_file=train, suffix="poet").status_code == 409
    set_status(api, first["id"], "failed")
    assert create_job(api, key, training_file=train, suffix="poet").status_code == 200


def test_warm_start_pins_the_version_and_its_length(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    train = file_id(api, key)
    api.upload(key, "base", native_bytes(api.spec, 4))
    api.upload(key, "base", native_bytes(api.spec, 6, seed=1))
    job = create_job(api, key, training_file=train, warm_start="base").json()
    assert job["prefix_options"]["warm_start"] == "base@2" and job["prefix_options"]["num_virtual_tokens"] == 6
    job = create_job(api, key, training_file=train, warm_start="base@1", suffix="x").json()
    assert job["prefix_options"]["warm_start"] == "base@1" and job["prefix_options"]["num_virtual_tokens"] == 4
    r = create_job(api, key, training_file=train, warm_start="base@1", num_virtual_tokens=8, suffix="y")
    assert r.status_code == 400 and "differs from the warm-start prefix base@1 (4)" in r.json()["error"]["message"]
    assert create_job(api, key, training_file=train, warm_start="base@3", suffix="y").status_code == 400
    with api.runtime.sessions() as s:  # a version recorded for another base model
        prefix = s.execute(sa.select(Prefix).where(Prefix.name == "base")).scalar_one()
        s.add(PrefixVersion(prefix_id=prefix.id, version=3, sha256="0" * 64, size_bytes=1, num_virtual_tokens=4,
                            source_format="native", base_model_fingerprint="another-model"))
        s.commit()
    r = create_job(api, key, training_file=train, warm_start="base@3", suffix="y")
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_mismatch"


def test_cancel(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    train = file_id(api, key)
    queued = create_job(api, key, training_file=train, suffix="a").json()
    r = api.client.post(f"/v1/fine_tuning/jobs/{queued['id']}/cancel", headers=bearer(key))
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"] is not None
    assert job_row(api, queued["id"]).cancel_requested
    r = api.client.post(f"/v1/fine_tuning/jobs/{queued['id']}/cancel", headers=bearer(key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_cancellable"

    running = create_job(api, key, training_file=train, suffix="b").json()
    set_status(api, running["id"], "running")
    for _ in range(2):  # idempotent while the worker has not stopped yet
        r = api.client.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel", headers=bearer(key))
        assert r.status_code == 200 and r.json()["status"] == "running"
    assert job_row(api, running["id"]).cancel_requested

    done = create_job(api, key, training_file=train, suffix="c").json()
    set_status(api, done["id"], "succeeded")
    r = api.client.post(f"/v1/fine_tuning/jobs/{done['id']}/cancel", headers=bearer(key))
    assert r.status_code == 409 and "already succeeded" in r.json()["error"]["message"]
    events = api.client.get(f"/v1/fine_tuning/jobs/{queued['id']}/events", headers=bearer(key)).json()["data"]
    assert events[0]["message"] == "Job cancelled"


def test_finished_job_shows_its_model_and_error(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    train = file_id(api, key)
    ok = create_job(api, key, training_file=train, suffix="poet").json()
    api.upload(key, "poet", native_bytes(api.spec))
    with api.runtime.sessions() as s:
        version_id = s.execute(sa.select(PrefixVersion.id)).scalar_one()
    set_status(api, ok["id"], "succeeded", result_prefix_version_id=version_id, trained_tokens=1234,
               finished_at=utcnow())
    got = api.client.get(f"/v1/fine_tuning/jobs/{ok['id']}", headers=bearer(key)).json()
    assert (got["fine_tuned_model"], got["trained_tokens"], got["status"]) == ("poet@1", 1234, "succeeded")
    assert isinstance(got["finished_at"], int)
    # The name it gives is one the completions endpoint serves (the model resolves; 404 would mean it does not).
    models = api.client.get(f"/v1/models/{got['fine_tuned_model']}", headers=bearer(key))
    assert models.status_code == 200

    bad = create_job(api, key, training_file=train, suffix="other").json()
    set_status(api, bad["id"], "failed", error={"code": "invalid_training_data", "message": "line 3: ...",
                                                "param": "training_file"})
    got = api.client.get(f"/v1/fine_tuning/jobs/{bad['id']}", headers=bearer(key)).json()
    assert got["error"] == {"code": "invalid_training_data", "message": "line 3: ...", "param": "training_file"}


def test_queue_down_leaves_the_job_queued(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    queue_of(api).down = True
    r = create_job(api, key, training_file=file_id(api, key))
    assert r.status_code == 200 and r.json()["status"] == "queued" and queue_of(api).enqueued == []
    # a process without a queue (job_queue = "none")
    api.client.app.state.runtime = replace(api.runtime, job_queue=None)  # type: ignore[attr-defined]
    r = create_job(api, key, training_file=file_id(api, key), suffix="second")
    assert r.status_code == 200 and r.json()["status"] == "queued"


def test_a_file_in_use_cannot_be_deleted(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    train = file_id(api, key)
    job = create_job(api, key, training_file=train).json()
    r = api.client.delete(f"/v1/files/{train}", headers=bearer(key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "file_in_use" and job["id"] in r.text
    api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=bearer(key))
    assert api.client.delete(f"/v1/files/{train}", headers=bearer(key)).status_code == 200
    got = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=bearer(key)).json()
    assert got["training_file"] is None and rows(api, File) == 0


def test_events_pages_and_metrics(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    job = create_job(api, key, training_file=file_id(api, key)).json()
    for step in (1, 2, 3):
        add_event(api, job["id"], f"Step {step}/3", {"step": step, "total_steps": 3, "train_loss": 1.0 / step})
    url = f"/v1/fine_tuning/jobs/{job['id']}/events"
    data = api.client.get(url, headers=bearer(key)).json()["data"]
    assert [e["message"] for e in data[:3]] == ["Step 3/3", "Step 2/3", "Step 1/3"]
    assert data[0]["object"] == "fine_tuning.job.event" and data[0]["type"] == "metrics"
    assert data[0]["data"] == {"step": 3, "total_steps": 3, "train_loss": pytest.approx(1 / 3)}
    assert data[-1]["type"] == "message" and data[-1]["data"] is None
    page = api.client.get(f"{url}?limit=2", headers=bearer(key)).json()
    assert len(page["data"]) == 2 and page["has_more"]
    rest = api.client.get(f"{url}?limit=10&after={page['data'][-1]['id']}", headers=bearer(key)).json()
    assert [e["id"] for e in rest["data"]] == [e["id"] for e in data[2:]] and not rest["has_more"]
    r = api.client.get(f"{url}?after=ftevent-nope", headers=bearer(key))
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"


def test_events_stream_until_the_job_ends(train_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    api = train_api
    _, key = api.tenant("acme")
    job = create_job(api, key, training_file=file_id(api, key)).json()
    set_status(api, job["id"], "running")
    first = add_event(api, job["id"], "Step 1/2", {"step": 1})

    # The worker below writes only once the stream has looked at the job and found it running with nothing new,
    # so the stream surely follows new events live (written after it started) and ends because the job did.
    polls: list[job_events.EventPoll] = []
    following = threading.Event()
    poll_events = job_events.poll_events

    def watched_poll(**kwargs: Any) -> job_events.EventPoll:
        polled = poll_events(**kwargs)
        polls.append(polled)
        if not polled.finished and not polled.events:
            following.set()
        return polled

    monkeypatch.setattr(job_events, "poll_events", watched_poll)

    def worker() -> None:  # what a worker does while the client follows the stream
        following.wait(60)  # bounded: written in any case, so the stream ends and the assertions below report
        add_event(api, job["id"], "Step 2/2", {"step": 2})
        add_event(api, job["id"], "Job succeeded")
        set_status(api, job["id"], "succeeded")

    thread = threading.Thread(target=worker)
    thread.start()
    with api.client.stream("GET", f"/v1/fine_tuning/jobs/{job['id']}/events?stream=true&after={first}",
                           headers=bearer(key)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        payloads = parse_sse(r.read().decode())
    thread.join()
    assert following.is_set(), "the stream never found the job running with no new event"
    assert [p["message"] for p in payloads[:-1]] == ["Step 2/2", "Job succeeded"] and payloads[-1] == "[DONE]"
    assert polls[-1].finished  # it ended because the job did
    # From the start: every event, oldest first; a finished job's stream ends at once.
    with api.client.stream("GET", f"/v1/fine_tuning/jobs/{job['id']}/events?stream=true", headers=bearer(key)) as r:
        messages = [p["message"] for p in parse_sse(r.read().decode())[:-1]]
    assert messages[0] == "Validating training data" and messages[-3:] == ["Step 1/2", "Step 2/2", "Job succeeded"]
    r = api.client.get("/v1/fine_tuning/jobs/ftjob-nope/events?stream=true", headers=bearer(key))
    assert r.status_code == 404
    assert api.client.get("/v1/fine_tuning/jobs/ftjob-%00/events", headers=bearer(key)).status_code == 404


def test_checkpoints(train_api: Api) -> None:
    api = train_api
    tenant_id, key = api.tenant("acme")
    job = create_job(api, key, training_file=file_id(api, key), suffix="poet").json()
    with api.runtime.sessions() as s:
        for step in (10, 20, 30):
            s.add(JobCheckpoint(job_id=job["id"], step=step, sha256=f"{step:064x}",
                                metrics={"train_loss": 1.0 / step, "val_loss": 2.0 / step}))
        s.commit()
    url = f"/v1/fine_tuning/jobs/{job['id']}/checkpoints"
    page = api.client.get(f"{url}?limit=2", headers=bearer(key)).json()
    assert [c["step_number"] for c in page["data"]] == [30, 20] and page["has_more"]
    c = page["data"][0]
    assert c["object"] == "fine_tuning.job.checkpoint" and c["fine_tuning_job_id"] == job["id"]
    assert c["fine_tuned_model_checkpoint"] == f"ft:{api.spec.model_id}:{tenant_id}:poet:{job['id']}:ckpt-step-30"
    assert c["metrics"] == {"step": 30.0, "train_loss": pytest.approx(1 / 30), "val_loss": pytest.approx(2 / 30),
                            "valid_loss": pytest.approx(2 / 30)}
    rest = api.client.get(f"{url}?after={page['last_id']}", headers=bearer(key)).json()
    assert [c["step_number"] for c in rest["data"]] == [10] and not rest["has_more"]


def test_the_openai_client_parses_everything(train_api: Api) -> None:
    api = train_api
    _, key = api.tenant("acme")
    client = openai.OpenAI(base_url=f"{api.client.base_url}/v1", api_key=key, http_client=api.client,
                           max_retries=0)
    f = client.files.create(file=("train.jsonl", jsonl([pc(i) for i in range(4)])), purpose="fine-tune")
    assert f.status == "processed" and f.purpose == "fine-tune"
    assert [x.id for x in client.files.list()] == [f.id]
    assert client.files.retrieve(f.id).bytes == f.bytes
    assert client.files.content(f.id).read() == jsonl([pc(i) for i in range(4)])
    with pytest.raises(openai.BadRequestError, match="line 1: invalid JSON"):
        client.files.create(file=("bad.jsonl", b"{oops\n"), purpose="fine-tune")

    job = client.fine_tuning.jobs.create(model=api.spec.model_id, training_file=f.id, suffix="poet", seed=3,
                                         hyperparameters={"n_epochs": 2}, extra_body={"num_virtual_tokens": 8})
    assert (job.status, job.seed, job.hyperparameters.n_epochs, job.training_file) == ("queued", 3, 2, f.id)
    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
    events = list(client.fine_tuning.jobs.list_events(job.id))
    assert events and events[0].object == "fine_tuning.job.event"
    assert list(client.fine_tuning.jobs.checkpoints.list(job.id)) == []
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=f.id)
    with pytest.raises(openai.BadRequestError, match=r"hyperparameters\.batch_size"):
        client.fine_tuning.jobs.create(model=api.spec.model_id, training_file=f.id,
                                       hyperparameters={"batch_size": 0})
    assert client.files.delete(f.id).deleted
