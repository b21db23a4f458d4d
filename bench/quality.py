"""Quality benchmark: does a prefix trained through our HTTP API learn a data-to-text task?

On the embedded SmolLM2 (CPU), with the seeded E2E-style task of bench/e2e_data.py (held-out names never seen in
training), it reports held-out exact match and BLEU (sacrebleu) for: the base model zero-shot, the base model
with a few-shot prompt, our prefix (trained through POST /v1/files + /v1/fine_tuning/jobs on a `prefixserve
serve` it starts), and HF PEFT prefix-tuning on the same data, steps, batch size, learning rate and seed; plus the
wall time per training step of ours and of PEFT's. The server is stopped before PEFT trains, so the two never
share the CPU. Prints a table and writes JSON.

    python -m bench.quality [--steps 150] [--batch-size 8] [--lr 3e-2] [--num-virtual-tokens 16] [--skip-peft]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.e2e_data import Example, generate, score

log = logging.getLogger("bench.quality")
ADMIN_KEY = "bench-admin-key"
INSTRUCTION = "Write one sentence that describes the restaurant, using every field.\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(data_dir: Path, port: int, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = os.environ | (extra_env or {}) | {
        "PREFIXSERVE_DATA_DIR": str(data_dir),
        "PREFIXSERVE_ADMIN_KEY": ADMIN_KEY,
        "PREFIXSERVE_PORT": str(port),
    }
    exe = Path(sys.executable).with_name("prefixserve")
    # The server's log goes to a file: a pipe nobody drains fills up and blocks every thread that logs.
    log_file = (data_dir / "server.log").open("wb")
    proc = subprocess.Popen([str(exe), "serve"], env=env, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(data_dir / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("server did not become ready in 300 s")


async def create_tenant(base: str, name: str = "bench") -> str:
    """A new tenant on the server at `base` (its admin key is ADMIN_KEY); returns the tenant's API key."""
    async with httpx.AsyncClient(base_url=base, timeout=600) as admin:
        r = await admin.post("/admin/tenants", json={"name": name}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        r.raise_for_status()
        return str(r.json()["api_key"])


async def _complete_all(client: httpx.AsyncClient, model: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy completions, stopped at the end of the line; 16 in flight so the engine batches them."""
    sem = asyncio.Semaphore(16)

    async def one(prompt: str) -> str:
        async with sem:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": ["\n"]}
            r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            return str(r.json()["choices"][0]["text"])

    return list(await asyncio.gather(*[one(p) for p in prompts]))


def _few_shot_prompt(shots: list[Example], ex: Example) -> str:
    demos = "".join(f"{s.prompt}{s.completion}\n\n" for s in shots)
    return INSTRUCTION + demos + ex.prompt


async def _all_events(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    """Every event of a job (the API pages them newest first, 100 at a time)."""
    events: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        r = await client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params)
        r.raise_for_status()
        page = r.json()
        events += page["data"]
        if not page.get("has_more") or not page["data"]:
            return events
        params["after"] = page["data"][-1]["id"]


async def _train_ours(client: httpx.AsyncClient, train_jsonl: bytes, args: argparse.Namespace) -> dict[str, Any]:
    files = {"file": ("train.jsonl", train_jsonl, "application/jsonl")}
    r = await client.post("/v1/files", files=files, data={"purpose": "fine-tune"})
    r.raise_for_status()
    body = {
        "model": args.base_model,
        "training_file": r.json()["id"],
        "suffix": "e2e",
        "seed": args.seed,
        "hyperparameters": {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr},
        "num_virtual_tokens": args.num_virtual_tokens,
        "prefix_projection": args.prefix_projection,
    }
    t0 = time.perf_counter()
    r = await client.post("/v1/fine_tuning/jobs", json=body)
    r.raise_for_status()
    job = r.json()
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        await asyncio.sleep(2)
        job = (await client.get(f"/v1/fine_tuning/jobs/{job['id']}")).json()
    wall = time.perf_counter() - t0
    if job["status"] != "succeeded":
        raise RuntimeError(f"training job {job['status']}: {job.get('error')}")
    events = await _all_events(client, job["id"])
    steps = [e for e in events if (e.get("data") or {}).get("step")]
    steps.sort(key=lambda e: e["created_at"])
    step_s = None
    if len(steps) >= 2:  # event timestamps are whole seconds: use the span of the whole run
        first, last = steps[0], steps[-1]
        step_s = (last["created_at"] - first["created_at"]) / max(1, last["data"]["step"] - first["data"]["step"])
    losses = [e["data"]["train_loss"] for e in steps if "train_loss" in e["data"]]
    return {
        "model": job["fine_tuned_model"],
        "train_wall_s": wall,
        "step_s": step_s,
        "final_train_loss": losses[-1] if losses else None,
        "job": job["id"],
    }


async def _serve_phase(train: list[Example], test: list[Example], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        proc = _start_server(Path(tmp), port)
        try:
            base = f"http://127.0.0.1:{port}"
            key = await create_tenant(base)
            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=base, timeout=3600, headers=headers) as client:
                args.base_model = (await client.get("/v1/models")).json()["data"][0]["id"]
                refs = [e.completion for e in test]
                shots = train[:3]
                zero = await _complete_all(client, args.base_model, [INSTRUCTION + e.prompt for e in test], 64)
                out["zero_shot"] = score(zero, refs)
                few = await _complete_all(client, args.base_model, [_few_shot_prompt(shots, e) for e in test], 64)
                out["few_shot"] = score(few, refs)
                log.info("base model: zero-shot %s, few-shot %s", out["zero_shot"], out["few_shot"])
                train_jsonl = "".join(json.dumps(e.record()) + "\n" for e in train).encode()
                ours = await _train_ours(client, train_jsonl, args)
                log.info("our training: %s", ours)
                hyps = await _complete_all(client, ours["model"], [e.prompt for e in test], 64)
                out["ours"] = score(hyps, refs) | ours
                out["ours_samples"] = [{"prompt": e.prompt, "ref": e.completion, "hyp": h}
                                       for e, h in list(zip(test, hyps, strict=True))[:5]]
        finally:
            proc.terminate()
            proc.wait(30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--num-virtual-tokens", type=int, default=16)
    ap.add_argument("--prefix-projection", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--out", default="bench/out/quality.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train, test = generate(args.train, args.test, args.seed)
    results = asyncio.run(_serve_phase(train, test, args))
    if not args.skip_peft:
        from bench.quality_peft import run_peft

        results["peft"] = run_peft(train, test, args)
    _report(results, args)


def _report(results: dict[str, Any], args: argparse.Namespace) -> None:
    lines = [
        f"quality: train={args.train} test={args.test} steps={args.steps} batch={args.batch_size} lr={args.lr} "
        f"P={args.num_virtual_tokens} projection={args.prefix_projection} seed={args.seed} "
        f"machine={platform.machine()} cpus={os.cpu_count()}",
        f"{'system':<34}{'exact %':>9}{'BLEU':>8}{'train s':>9}{'s/step':>8}",
    ]
    names = {"zero_shot": "base model, zero-shot", "few_shot": "base model, 3-shot prompt",
             "ours": "our prefix (HTTP API)", "peft": "HF PEFT prefix-tuning"}
    for key, label in names.items():
        r = results.get(key)
        if r is None:
            continue
        train_s = f"{r['train_wall_s']:.0f}" if "train_wall_s" in r else "-"
        step_s = f"{r['step_s']:.2f}" if r.get("step_s") else "-"
        lines.append(f"{label:<34}{r['exact_match']:>9.1f}{r['bleu']:>8.1f}{train_s:>9}{step_s:>8}")
    log.info("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
