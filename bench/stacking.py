"""Two-level personalization benchmark: a task prefix for every user, a user prefix on top of it.

bench/user_styles.py gives each user the task style shared by all users plus their own quirks. On a server it
starts (or `--url`), this trains one task prefix on the examples of `--task-users` other users (the application's
data: the shared task style under many users' quirks; `POST /v1/files` + `/v1/fine_tuning/jobs`, suffix `task`,
default settings), then for each measured user (none of them in the task data, and none of their held-out names
either) scores their held-out examples (greedy `/v1/completions`, exact match) with:
  (i)   the task prefix alone (`model: "task"`);
  (ii)  a user prefix trained from scratch on the user's few examples (`user:<id>`, `warm_start: null`);
  (iii) a user prefix trained `on_top_of` the task prefix, served as the stack `task+user:<id>`, once per entry of
        `--stack-hp` (default: the defaults, and the defaults cut to 40 steps, to see how soon it gets there);
each personalization timed from the call until the model answers.

    python -m bench.stacking [--users ann,bob,cy] [--train 24] [--test 30] [--task-users 12]
                             [--stack-hp '[{}, {"max_steps": 40}]']
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import httpx

from bench.e2e_data import Example
from bench.personalize import evaluate, load_average, personalize, service
from bench.user_styles import generate_user

log = logging.getLogger("bench.stacking")


async def train_task(client: httpx.AsyncClient, train: list[Example], seed: int) -> dict[str, Any]:
    """The task prefix on every user's examples (default settings); its job's wall time and name."""
    data = "".join(json.dumps(e.record()) + "\n" for e in train).encode()
    r = await client.post("/v1/files", files={"file": ("task.jsonl", data, "application/jsonl")},
                          data={"purpose": "fine-tune"})
    r.raise_for_status()
    base = (await client.get("/v1/models")).json()["data"][0]["id"]
    t0 = time.perf_counter()
    r = await client.post("/v1/fine_tuning/jobs", json={"model": base, "training_file": r.json()["id"],
                                                         "suffix": "task", "seed": seed})
    r.raise_for_status()
    job = r.json()
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        await asyncio.sleep(1)
        job = (await client.get(f"/v1/fine_tuning/jobs/{job['id']}")).json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"task job {job['status']}: {job.get('error')}")
    return {"model": "task", "wall_s": time.perf_counter() - t0, "hyperparameters": job["hyperparameters"]}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    users = args.users.split(",")
    data = {u: generate_user(u, args.train, args.test, args.seed) for u in users}
    task_data = [e for i in range(args.task_users) for e in generate_user(f"t{i}", args.task_train, 0, args.seed)[0]]
    out: dict[str, Any] = {"users": {}}
    async with service(args.url, args.key) as client:
        out["task"] = await train_task(client, task_data, args.seed) | {"examples": len(task_data)}
        log.info("task prefix: %s", out["task"])
        for u in users:
            train, test = data[u]
            row: dict[str, Any] = {"task_alone": await evaluate(client, "task", test)}
            scratch = await personalize(client, u, train, {"seed": args.seed, "warm_start": None})
            row["scratch"] = scratch | await evaluate(client, scratch["model"], test)
            row["stacked"] = []
            for i, hp in enumerate(json.loads(args.stack_hp)):
                body: dict[str, Any] = {"seed": args.seed, "warm_start": None, "on_top_of": "task"}
                if hp:
                    body["hyperparameters"] = hp
                stacked = await personalize(client, f"{u}-on-task-{i}", train, body,
                                            model=f"task+user:{u}-on-task-{i}")
                row["stacked"].append(stacked | await evaluate(client, stacked["model"], test) | {"hp": hp})
            out["users"][u] = row
            log.info("%s: task alone %.1f%%, scratch %.1f%% (%.0f s), task+user %s", u,
                     row["task_alone"]["exact_match"], row["scratch"]["exact_match"], scratch["servable_s"],
                     ", ".join(f"{r['exact_match']:.1f}% ({r['servable_s']:.0f} s, {r['steps']} steps)"
                               for r in row["stacked"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", default="ann,bob,cy")
    ap.add_argument("--train", type=int, default=24, help="examples per user")
    ap.add_argument("--test", type=int, default=30, help="held-out examples per user")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task-users", type=int, default=12, help="other users whose examples train the task prefix")
    ap.add_argument("--task-train", type=int, default=24, help="examples per task user")
    ap.add_argument("--stack-hp", default='[{}, {"max_steps": 40}]',
                    help="JSON list: hyperparameters of each stacked user prefix trained ({} = the defaults)")
    ap.add_argument("--url", help="a running server (with --key) instead of starting one")
    ap.add_argument("--key", help="a tenant API key for --url")
    ap.add_argument("--out", default="bench/out/stacking.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    load_before = load_average()
    out = asyncio.run(run(args))
    out |= {"load_before": load_before, "load_after": load_average(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    lines = [f"stacking: users={args.users} train={args.train} test={args.test}; task prefix from "
             f"{out['task']['examples']} examples in {out['task']['wall_s']:.0f} s; load {load_before} -> "
             f"{out['load_after']}",
             f"{'user':<8}{'task alone':>12}{'scratch':>10}{'s':>6}" + "".join(
                 f"  {'task+user ' + json.dumps(hp):>30}{'s':>6}" for hp in json.loads(args.stack_hp))]
    for u, row in out["users"].items():
        lines.append(f"{u:<8}{row['task_alone']['exact_match']:>11.1f}%{row['scratch']['exact_match']:>9.1f}%"
                     f"{row['scratch']['servable_s']:>6.0f}" + "".join(
                         f"{r['exact_match']:>31.1f}%{r['servable_s']:>6.0f}" for r in row["stacked"]))
    log.info("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "result": out}, indent=2))


if __name__ == "__main__":
    main()
