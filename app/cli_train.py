"""`prefixserve train`: create a fine-tuning job from a JSONL file and follow it to the end.

Against a server (`--server URL --api-key KEY`): upload the file (`POST /v1/files`), create the job
(`POST /v1/fine_tuning/jobs`) and follow its live event stream (`GET .../events?stream=true`, reconnecting from
the last event seen). In-process (no `--server`): on the local embedded deployment (the same settings, database
and blob store as `prefixserve serve`), create the same File and TrainingJob rows through the same services and
run the job here with `execute_job`. Ctrl-C cancels the job (a second Ctrl-C leaves at once).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from rich.console import Console

from app.cli_progress import JobProgress, TrainOptions, summary
from app.config import Settings
from app.db.models import JOB_TERMINAL_STATUSES, Tenant, TrainingJob
from app.errors import ServiceError
from app.protocol.fine_tuning import FineTuningJobCreate
from app.runtime import job_context, load_base_model, open_runtime
from app.services import files, fine_tuning
from app.services.fine_tuning import job_object, request_cancel
from app.services.job_events import poll_events
from app.services.tenants import create_tenant
from app.training.jobs import execute_job

log = logging.getLogger(__name__)

POLL_S = 0.5
STREAM_RETRIES = 30


class TrainCommandError(Exception):
    """A request was refused or the server cannot be reached; the message says why."""


# ---- against a server --------------------------------------------------------------------------------------------
def _check(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        raise TrainCommandError(f"{what}: HTTP {response.status_code}: {message}")
    out: dict[str, Any] = response.json()
    return out


def _upload(client: httpx.Client, path: Path) -> str:
    with path.open("rb") as f:
        r = client.post("/v1/files", files={"file": (path.name, f, "application/jsonl")},
                        data={"purpose": "fine-tune"})
    return str(_check(r, f"uploading {path}")["id"])


def _base_model(client: httpx.Client) -> str:
    models = _check(client.get("/v1/models"), "listing models")["data"]
    base = [m["id"] for m in models if m.get("parent") is None]
    if not base:
        raise TrainCommandError("the server lists no base model; pass --model")
    return str(base[0])


def _stream_events(client: httpx.Client, job_id: str, after: str | None) -> Iterator[dict[str, Any]]:
    params = {"stream": "true", **({"after": after} if after else {})}
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params=params) as r:
        if r.status_code >= 400:
            r.read()
            _check(r, "following the job's events")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            payload = line.removeprefix("data:").strip()
            if payload == "[DONE]":
                return
            yield json.loads(payload)


def _follow_remote(client: httpx.Client, job_id: str, view: JobProgress) -> dict[str, Any]:
    last: str | None = None
    failures = 0
    while True:
        try:
            for event in _stream_events(client, job_id, last):
                view.event(event)
                last, failures = event["id"], 0
        except httpx.TransportError as exc:
            failures += 1
            if failures > STREAM_RETRIES:
                raise TrainCommandError(f"lost the connection to the server: {exc}") from None
            time.sleep(1.0)
        job = _check(client.get(f"/v1/fine_tuning/jobs/{job_id}"), "reading the job")
        if job["status"] in JOB_TERMINAL_STATUSES:
            return job


def train_remote(*, data: Path, validation: Path | None, opts: TrainOptions, server: str, api_key: str,
                 console: Console) -> bool:
    """Upload, create the job, follow it; True when it succeeded."""
    timeout = httpx.Timeout(60.0, connect=10.0)
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout) as client:
        try:
            training_file = _upload(client, data)
            validation_file = _upload(client, validation) if validation is not None else None
            body = opts.body(model=opts.model or _base_model(client), training_file=training_file,
                             validation_file=validation_file)
            job = _check(client.post("/v1/fine_tuning/jobs", json=body), "creating the job")
        except httpx.TransportError as exc:
            raise TrainCommandError(f"cannot reach {server}: {exc}") from None
        console.print(f"job {job['id']} created ({job['status']}); Ctrl-C cancels it")
        return _run_view(console, lambda view: _follow_remote(client, job["id"], view),
                         cancel=lambda: _check(client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"), "cancel"))


def _run_view(console: Console, follow: Callable[[JobProgress], dict[str, Any]], *, cancel: Callable[[], object]
              ) -> bool:
    """Follow a job with the progress view; the first Ctrl-C cancels the job and keeps following it."""
    with JobProgress(console) as view:
        try:
            job = follow(view)
        except KeyboardInterrupt:
            console.print("[yellow]cancelling the job (Ctrl-C again to leave at once)[/yellow]")
            cancel()
            job = follow(view)
    text, ok = summary(job, view)
    console.print(text)
    return ok


# ---- in-process --------------------------------------------------------------------------------------------------
def train_local(*, data: Path, validation: Path | None, opts: TrainOptions, settings: Settings, tenant: str,
                console: Console) -> bool:
    """Create the File and job rows in the local deployment and run the job in this process."""
    runtime = open_runtime(settings, load_model=False)
    try:
        console.print(f"loading {settings.model} ...")
        runtime = replace(runtime, model=load_base_model(settings, torch_threads=settings.training_torch_threads
                                                         or settings.torch_threads))
        job_id = _create_local_job(runtime, data=data, validation=validation, opts=opts, tenant=tenant,
                                   console=console)
        worker = threading.Thread(target=_execute, args=(runtime, job_id), name="train", daemon=True)
        worker.start()
        def cancel() -> None:
            with runtime.sessions() as session:
                request_cancel(session, job_id)
                session.commit()

        return _run_view(console, lambda view: _follow_local(runtime, job_id, worker, view), cancel=cancel)
    finally:
        runtime.close()


def _execute(runtime: Any, job_id: str) -> None:
    outcome = execute_job(job_id, ctx=job_context(runtime), timeout_s=runtime.settings.job_timeout_s)
    # "skipped": a server's in-process worker sharing this database claimed it first; we follow it anyway.
    log.debug("job %s: %s", job_id, outcome)


def _create_local_job(runtime: Any, *, data: Path, validation: Path | None, opts: TrainOptions, tenant: str,
                      console: Console) -> str:
    stores = runtime.prefix_stores()
    with runtime.sessions() as session:
        tenant_id = _local_tenant(session, tenant, console)
        try:
            ids = [files.create_file(session=session, stores=stores, tenant_id=tenant_id,
                                     upload=files.Upload("fine-tune", p.name, p.read_bytes()),
                                     max_examples=runtime.settings.max_file_examples).id
                   if p is not None else None for p in (data, validation)]
            body = opts.body(model=opts.model or runtime.model.spec.model_id, training_file=str(ids[0]),
                             validation_file=ids[1])
            job = fine_tuning.create_job(session=session, ctx=runtime.training_context(), tenant_id=tenant_id,
                                         req=FineTuningJobCreate.model_validate(body))
        except ServiceError as exc:
            raise TrainCommandError(exc.message) from None
    console.print(f"job {job.id} created for tenant {tenant!r}; Ctrl-C cancels it")
    return job.id


def _local_tenant(session: Any, name: str, console: Console) -> str:
    found = session.execute(sa.select(Tenant.id).where(Tenant.name == name)).scalar()
    if found is not None:
        return str(found)
    created = create_tenant(session=session, name=name)
    console.print(f"created tenant {name!r}; its API key (shown once): {created.api_key}")
    return created.id


def _follow_local(runtime: Any, job_id: str, worker: threading.Thread, view: JobProgress) -> dict[str, Any]:
    cursor = None
    while True:
        polled = poll_events(sessions=runtime.sessions, job_id=job_id, cursor=cursor)
        for e in polled.events:
            view.event(e.model_dump(mode="json"))
        cursor = polled.cursor
        if polled.status is None:
            raise TrainCommandError(f"job {job_id} was deleted")
        if polled.finished and not worker.is_alive():
            with runtime.sessions() as session:
                job = session.get(TrainingJob, job_id)
                if job is None:
                    raise TrainCommandError(f"job {job_id} was deleted")
                out: dict[str, Any] = job_object(session, job).model_dump(mode="json")
            return out
        time.sleep(POLL_S)
