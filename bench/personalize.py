"""Personalization benchmark: a user's own phrasing learnt from a few examples, with the default settings.

What an application does, on the real service (`prefixserve serve` on the embedded default model, started here
unless `--url` names a running one): post one user's examples (bench/user_styles.py: a synthetic user style over
the data-to-text task, every name a made-up word, held-out names never seen in training) to
`POST /v1/users/<user>/examples`, call `POST /v1/users/<user>/personalize` with no hyperparameters (only a seed,
so a run can be repeated), follow the job's event stream to its end, and time the call until `user:<user>`
answers a completion. Then every held-out example is completed greedily through `/v1/completions` and scored
(exact match, BLEU). Reports the wall time call -> servable, the steps and seconds per step, and the score.

    python -m bench.personalize [--train 24] [--test 50] [--user ann] [--hp '{"max_steps": 40}'] [--url URL --key KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.e2e_data import Example, score
from bench.quality import _complete_all, _free_port, _start_server, create_tenant
from bench.user_styles import generate_user

log = logging.getLogger("bench.personalize")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


@asynccontextmanager
async def service(url: str | None, key: str | None) -> Any:
    """An API client with a tenant's key: on `url` with `key`, or on a server started here (stopped after)."""
    if url is not None and key is not None:
        async with httpx.AsyncClient(base_url=url, timeout=3600, headers={"Authorization": f"Bearer {key}"}) as c:
            yield c
        return
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        proc = _start_server(Path(tmp), port)
        try:
            base = f"http://127.0.0.1:{port}"
            tenant_key = await create_tenant(base)
            async with httpx.AsyncClient(base_url=base, timeout=3600,
                                         headers={"Authorization": f"Bearer {tenant_key}"}) as client:
                yield client
        finally:
            proc.terminate()
            proc.wait(30)


async def follow_job(client: httpx.AsyncClient, job_id: str, t0: float) -> list[dict[str, Any]]:
    """Every event of the job as the SSE stream delivers it, each with `arrived_s` (seconds since t0)."""
    events: list[dict[str, Any]] = []
    async with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            event["arrived_s"] = time.perf_counter() - t0
            events.append(event)
            log.debug("%.1f s: %s", event["arrived_s"], event["message"])
    return events


async def personalize(client: httpx.AsyncClient, user: str, train: list[Example], body: dict[str, Any], *,
                      model: str | None = None) -> dict[str, Any]:
    """Post the examples, personalize, wait until `model` (default `user:<user>`) serves; the timings and the
    job's facts."""
    r = await client.post(f"/v1/users/{user}/examples", json={"examples": [e.record() for e in train]})
    r.raise_for_status()
    t0 = time.perf_counter()
    r = await client.post(f"/v1/users/{user}/personalize", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"personalize: {r.status_code} {r.text}")
    job = r.json()
    events = await follow_job(client, job["id"], t0)
    job = (await client.get(f"/v1/fine_tuning/jobs/{job['id']}")).json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"training job {job['status']}: {job.get('error')}")
    model = model or f"user:{user}"
    probe = {"model": model, "prompt": train[0].prompt, "max_tokens": 1, "temperature": 0}
    r = await client.post("/v1/completions", json=probe)
    r.raise_for_status()
    servable_s = time.perf_counter() - t0
    steps = [e for e in events if (e.get("data") or {}).get("step")]
    first, last = (steps[0], steps[-1]) if steps else (None, None)
    step_s = None
    if first is not None and last is not None and last["data"]["step"] > first["data"]["step"]:
        step_s = (last["arrived_s"] - first["arrived_s"]) / (last["data"]["step"] - first["data"]["step"])
    return {
        "job": job["id"], "model": model, "servable_s": servable_s,
        "first_step_s": first["arrived_s"] if first else None, "last_step_s": last["arrived_s"] if last else None,
        "steps": last["data"]["step"] if last else 0, "step_s": step_s,
        "final_train_loss": last["data"].get("train_loss") if last else None,
        "hyperparameters": job["hyperparameters"], "prefix_options": job["prefix_options"],
    }


async def evaluate(client: httpx.AsyncClient, model: str, test: list[Example]) -> dict[str, Any]:
    hyps = await _complete_all(client, model, [e.prompt for e in test], 64)
    out: dict[str, Any] = score(hyps, [e.completion for e in test])
    out["samples"] = [{"ref": e.completion, "hyp": h} for e, h in list(zip(test, hyps, strict=True))[:3]]
    out["wrong"] = [{"ref": e.completion, "hyp": h} for e, h in zip(test, hyps, strict=True)
                    if h.strip() != e.completion.strip()][:5]
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    train, test = generate_user(args.user, args.train, args.test, args.seed)
    body: dict[str, Any] = {"seed": args.seed}
    if args.hp:
        body["hyperparameters"] = json.loads(args.hp)
    body.update(json.loads(args.options) if args.options else {})
    async with service(args.url, args.key) as client:
        user = args.user if args.url is None else f"{args.user}-{int(time.time())}"  # a fresh user on a reused server
        result = await personalize(client, user, train, body)
        log.info("personalized: %s", {k: v for k, v in result.items() if k != "prefix_options"})
        result |= await evaluate(client, result["model"], test)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--user", default="ann", help="whose style (bench/user_styles.py)")
    ap.add_argument("--train", type=int, default=24, help="examples posted (the goal: at most 30)")
    ap.add_argument("--test", type=int, default=50, help="held-out examples scored")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hp", default="", help="hyperparameters JSON (default: none, the server's defaults)")
    ap.add_argument("--options", default="", help="other personalize fields as JSON, e.g. num_virtual_tokens")
    ap.add_argument("--url", help="a running server (with --key) instead of starting one")
    ap.add_argument("--key", help="a tenant API key for --url")
    ap.add_argument("--out", default="bench/out/personalize.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request
    load_before = load_average()
    result = asyncio.run(run(args))
    result |= {"load_before": load_before, "load_after": load_average(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    step_s = f"{result['step_s']:.2f}" if result["step_s"] else "-"
    log.info("personalize: user=%s train=%d test=%d hp=%s options=%s\n"
             "call->servable %.1f s (first step at %.1f s, last at %.1f s), %d steps, %s s/step, final train loss %s,"
             " held-out exact match %.1f%%, BLEU %.1f; load %s -> %s",
             args.user, args.train, args.test, args.hp or "defaults", args.options or "defaults",
             result["servable_s"], result["first_step_s"] or 0, result["last_step_s"] or 0, result["steps"], step_s,
             result["final_train_loss"], result["exact_match"], result["bleu"], result["load_before"],
             result["load_after"])
    for w in result["wrong"][:3]:
        log.info("  wrong: %r\n    ref: %r", w["hyp"], w["ref"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "result": result}, indent=2))


if __name__ == "__main__":
    main()
