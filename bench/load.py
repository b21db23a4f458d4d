"""Load test: bursts of simultaneous requests driven by Locust, every response verified.

    python -m bench.load --target embedded --target cluster [--bursts 400,2000] [-p 200] [--max-tokens 24]
    python -m bench.load --url http://127.0.0.1:8000 --admin-key KEY [--model M] ...   # servers already running
    make bench-load BENCH_LOAD_ARGS="--target embedded --bursts 50 -p 20"              # a small smoke run

Targets: `embedded` starts one `prefixserve serve` on its defaults (SQLite, in-process cache, local blobs; data
dir in a temp dir, free port) and stops it afterwards; `cluster` starts scripts/cluster.sh (PostgreSQL, Redis,
SeaweedFS, 2 API replicas, 1 worker) and stops it afterwards; `--url` uses servers already running.

For each target:
1. set-up (bench/load_setup.py): a fresh tenant, P random prefixes of the served model uploaded, one request
   (its own prompt) per prefix plus a few on the base model;
2. references: each distinct request served alone (one at a time per server), greedy, `ignore_eos`, fixed
   `max_tokens`;
3. bursts: for each size N, Locust (headless, bench/locustfile.py) spawns N users that wait at a barrier and
   then each send one request at once (chosen at random, a share streamed over SSE, spread over the servers);
   the burst ends when all N have an answer or at the deadline.

Every response must be the reference text with exactly `max_tokens` completion tokens, or a 429/503 carrying
`Retry-After` (load shed: the server is allowed to refuse a burst, not to fail it). Anything else fails the run:
a 500 or other status, a 429/503 without Retry-After, a client timeout or a request still unanswered at the
deadline (a hang), a stream cut before `data: [DONE]` or carrying an error event, a wrong answer.
Reports, per target and burst: throughput (answered requests/s, completion tokens/s over the burst's wall
time), latency, time to first token and inter-token latency (streamed requests; the gap between consecutive
text chunks) p50/p90/p99, status counts, wrong answers. Exit status 1 on any failure.

Why Locust: the check this bench exists for is per response (exact text against a reference, Retry-After on
a refusal), which needs our own code in the request loop. Locust is a maintained load tool whose users are
plain Python, so the check lives in the user class and Locust does the rest (spawning thousands of concurrent
users on gevent, timeouts, its statistics table and CSV files). guidellm and aiperf (both installable from
PyPI here) generate their own prompts from datasets or synthetic token counts and report aggregate latency
and throughput; neither lets us compare each answer with its reference or inspect the headers of a refused
request, and both pull in pandas/pyarrow/datasets (aiperf also matplotlib, scipy, kubernetes) for features
we would not use.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.load_setup import ROOT, Target, Workload, delete_tenant, prepare, start_cluster, start_embedded

log = logging.getLogger("bench.load")
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def _body(spec_model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"model": spec_model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def references(target: Target, work: Workload, max_tokens: int, timeout_s: float) -> list[str]:
    """Every distinct request served alone: one at a time on each server (the servers in parallel)."""
    out: list[str | None] = [None] * len(work.requests)
    stop = threading.Event()  # a failure or Ctrl-C: the other servers' loops end after their current request

    def serve(url_index: int) -> None:
        with httpx.Client(timeout=timeout_s) as client:
            for k in range(url_index, len(work.requests), len(target.urls)):
                if stop.is_set():
                    return
                spec = work.requests[k]
                r = client.post(f"{target.urls[url_index]}/v1/completions", headers=work.headers,
                                json=_body(spec.model, spec.prompt, max_tokens))
                if r.status_code != 200:
                    raise RuntimeError(f"reference request for {spec.model!r} failed: {r.status_code} {r.text[:300]}")
                data = r.json()
                if data["usage"]["completion_tokens"] != max_tokens:
                    raise RuntimeError(f"reference for {spec.model!r}: {data['usage']['completion_tokens']} "
                                       f"completion tokens, not {max_tokens} (ignore_eos not honoured?)")
                out[k] = data["choices"][0]["text"]

    with ThreadPoolExecutor(len(target.urls)) as pool:
        try:
            for f in [pool.submit(serve, i) for i in range(len(target.urls))]:
                f.result()
        except BaseException:
            stop.set()
            raise
    return [text or "" for text in out]


def _pcts(values: list[float], scale: float = 1e3) -> dict[str, float | None]:
    """p50/p90/p99 (milliseconds by default); None without samples."""
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    if len(values) == 1:
        return {f"p{q}": round(values[0] * scale, 1) for q in (50, 90, 99)}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {f"p{p}": round(q[p - 1] * scale, 1) for p in (50, 90, 99)}


def classify(rec: dict[str, Any], refs: list[str], max_tokens: int) -> str:
    """One response's verdict: 'ok', 'shed' (429/503 with Retry-After), or the failure's name."""
    status = rec.get("status", 0)
    if status == 0:
        return "timeout" if rec.get("timeout") else "client-error"
    if status in (429, 503):
        return "shed" if rec.get("retry_after") else f"{status}-without-retry-after"
    if status != 200:
        return f"http-{status}"
    if rec.get("error"):
        return "timeout" if rec.get("timeout") else "stream-error"
    if rec.get("text") != refs[rec["k"]]:
        return "wrong-answer"
    if rec.get("completion_tokens") != max_tokens:
        return "wrong-token-count"
    return "ok"


def summarize(records: list[dict[str, Any]], planned: int, refs: list[str], work: Workload,
              max_tokens: int) -> dict[str, Any]:
    verdicts = Counter(classify(r, refs, max_tokens) for r in records)
    if planned > len(records):
        verdicts["unanswered-at-deadline"] += planned - len(records)
    statuses = Counter(str(r.get("status", 0)) + ("+Retry-After" if r.get("retry_after") else "") for r in records)
    ok = [r for r in records if classify(r, refs, max_tokens) == "ok"]
    sent = [r["t_send"] for r in records if "t_send" in r]
    ended = [r["t_end"] for r in records if "t_end" in r]
    wall = max(ended) - min(sent) if sent and ended else 0.0
    tokens = sum(r["completion_tokens"] for r in ok)
    streamed_ok = [r for r in ok if r["stream"]]
    wrong = [{"model": work.requests[r["k"]].model, "prompt": work.requests[r["k"]].prompt,
              "expected": refs[r["k"]], "got": r.get("text"), "stream": r["stream"]}
             for r in records if classify(r, refs, max_tokens) == "wrong-answer"]
    failures = {v: n for v, n in verdicts.items() if v not in ("ok", "shed")}
    shed_reasons: Counter[str] = Counter()
    for r in records:
        if classify(r, refs, max_tokens) == "shed":
            try:
                code = json.loads(r.get("body") or "{}")["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "?"
            shed_reasons[f"{r['status']} {code}"] += 1
    return {
        "requests": planned, "answered": len(records), "ok": len(ok), "shed": verdicts.get("shed", 0),
        "streamed_ok": len(streamed_ok), "wall_s": round(wall, 2),
        "throughput_rps": round(len(ok) / wall, 2) if wall else None,
        "completion_tokens_per_s": round(tokens / wall, 1) if wall else None,
        "latency_ms": _pcts([r["latency_s"] for r in ok]),
        "ttft_ms": _pcts([r["ttft_s"] for r in streamed_ok if r.get("ttft_s") is not None]),
        "itl_ms": _pcts([g for r in streamed_ok for g in r.get("itl_s", [])]),
        "status_counts": dict(sorted(statuses.items())), "verdicts": dict(sorted(verdicts.items())),
        "shed_reasons": dict(shed_reasons.most_common()),
        "failures": failures, "wrong_answers": len(wrong), "wrong_examples": wrong[:5],
        "errors_examples": [{k: r.get(k) for k in ("status", "retry_after", "error", "body", "stream")}
                            for r in records if classify(r, refs, max_tokens) not in ("ok", "shed", "wrong-answer")
                            ][:5],
    }


def run_burst(target: Target, work: Workload, refs: list[str], n: int, args: argparse.Namespace,
              run_dir: Path) -> dict[str, Any]:
    """One burst of n simultaneous requests through Locust; returns its summary."""
    rng = random.Random(args.seed * 7919 + n)
    plan = [[rng.randrange(len(work.requests)), i % len(target.urls), rng.random() < args.stream_ratio]
            for i in range(n)]
    deadline = args.request_timeout + 60  # the slowest request may wait its whole timeout after the spawn
    plan_path, results_path = run_dir / f"plan-{n}.json", run_dir / f"results-{n}.jsonl"
    plan_path.write_text(json.dumps({
        "api_key": work.api_key, "urls": target.urls, "max_tokens": args.max_tokens,
        "request_timeout_s": args.request_timeout, "deadline_s": deadline, "results": str(results_path),
        "requests": [{"model": s.model, "prompt": s.prompt} for s in work.requests], "references": refs,
        "plan": plan,
    }))
    results_path.unlink(missing_ok=True)
    cmd = [str(ROOT / ".venv" / "bin" / "locust"), "-f", str(LOCUSTFILE), "--headless", "-u", str(n), "-r", str(n),
           "--host", target.urls[0], "--run-time", f"{int(deadline + 30)}s", "--stop-timeout", "5",
           "--only-summary", "--csv", str(run_dir / f"locust-{n}"), "--exit-code-on-error", "0",
           "--loglevel", "WARNING"]
    log.info("burst of %d: %s", n, " ".join(cmd))
    started = time.monotonic()
    # Other work on the machine shares the CPUs with the servers: the load average says how much there was.
    load_before = os.getloadavg()
    proc = subprocess.run(cmd, env={**os.environ, "BENCH_LOAD_PLAN": str(plan_path)}, timeout=deadline + 120,
                          check=False)
    log.info("burst of %d: locust exited %d after %.1f s", n, proc.returncode, time.monotonic() - started)
    records = ([json.loads(line) for line in results_path.read_text().splitlines()]
               if results_path.exists() else [])
    summary = summarize(records, n, refs, work, args.max_tokens)
    if proc.returncode != 0:
        summary["failures"]["locust-exit-" + str(proc.returncode)] = 1
    summary["stream_ratio"] = args.stream_ratio
    summary["loadavg_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    return summary


def run_target(name: str, target: Target, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"target": name, "servers": target.urls, "model": target.model, "bursts": {}}
    with httpx.Client(timeout=120) as client:
        t0 = time.perf_counter()
        work = prepare(client, target, prefixes=args.prefixes, virtual_tokens=args.virtual_tokens, seed=args.seed)
        out["setup_s"] = round(time.perf_counter() - t0, 1)
        try:
            t0 = time.perf_counter()
            refs = references(target, work, args.max_tokens, args.request_timeout)
            out["distinct_requests"] = len(refs)
            out["references_s"] = round(time.perf_counter() - t0, 1)
            log.info("%s: %d reference answers in %.1f s", name, len(refs), out["references_s"])
            for n in args.bursts:
                summary = run_burst(target, work, refs, n, args, run_dir)
                out["bursts"][str(n)] = summary
                log.info("%s, burst of %d: %s", name, n, json.dumps({k: summary[k] for k in (
                    "ok", "shed", "wall_s", "throughput_rps", "completion_tokens_per_s", "ttft_ms", "itl_ms",
                    "status_counts", "failures")}))
                time.sleep(2)  # let the servers settle (closed sockets, finished rows) before the next burst
        finally:
            if not args.keep_tenant:
                delete_tenant(client, target, work.tenant_id)
    return out


def _table(report: dict[str, Any]) -> str:
    lines = [f"{'target':<10}{'burst':>6}{'ok':>6}{'shed':>6}{'fail':>6}{'wrong':>6}{'wall s':>8}{'req/s':>8}"
             f"{'tok/s':>8}  {'TTFT p50/p90/p99 ms':<24}{'ITL p50/p90/p99 ms':<22}statuses"]
    for t in report["targets"]:
        for n, b in t["bursts"].items():
            def trio(d: dict[str, float | None]) -> str:
                return "/".join("-" if v is None else f"{v:.0f}" for v in d.values())
            lines.append(f"{t['target']:<10}{n:>6}{b['ok']:>6}{b['shed']:>6}{sum(b['failures'].values()):>6}"
                         f"{b['wrong_answers']:>6}{b['wall_s']:>8.1f}{b['throughput_rps'] or 0:>8.2f}"
                         f"{b['completion_tokens_per_s'] or 0:>8.1f}  {trio(b['ttft_ms']):<24}{trio(b['itl_ms']):<22}"
                         f"{b['status_counts']}")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--target", action="append", choices=("embedded", "cluster"), default=[],
                   help="start this target for the run (repeat for both, in order)")
    p.add_argument("--url", action="append", default=[], help="a running server (repeat for several replicas)")
    p.add_argument("--admin-key", help="the running servers' admin key (with --url)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the PREFIXSERVE_MODEL the servers run")
    p.add_argument("--bursts", default="400,2000", help="comma-separated burst sizes (simultaneous requests)")
    p.add_argument("-p", "--prefixes", type=int, default=200)
    p.add_argument("--virtual-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=24, help="every request's max_tokens (with ignore_eos)")
    p.add_argument("--stream-ratio", type=float, default=0.5, help="share of requests streamed (SSE)")
    # Below the server's own 600 s REQUEST_TIMEOUT_S (a 504), above the ~290 s the last request of a 2,000 burst
    # waited on the 2-core cluster (bench/RESULTS.md).
    p.add_argument("--request-timeout", type=float, default=400.0,
                   help="client timeout: a request (or a stream) silent this long is a hang")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-tenant", action="store_true", help="leave the bench tenant and its prefixes")
    p.add_argument("--out", type=Path, help="write the report as JSON here too")
    args = p.parse_args(argv)
    if not args.target and not args.url:
        p.error("name a --target (embedded, cluster) or --url")
    if args.url and not args.admin_key:
        p.error("--url needs --admin-key")
    args.bursts = [int(b) for b in args.bursts.split(",") if b]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = _parse(argv)
    report: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                         if k != "admin_key"}, "targets": []}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        runs: list[tuple[str, Callable[[Path], tuple[Target, Callable[[], None]]]]] = []
        for name in args.target:
            if name == "embedded":
                def embedded(d: Path) -> tuple[Target, Callable[[], None]]:
                    server = start_embedded(d / "data", args.model)
                    return server.target, server.stop
                runs.append(("embedded", embedded))
            else:
                runs.append(("cluster", lambda d: start_cluster(d / "cluster", args.model)))
        if args.url:
            runs.append(("url", lambda d: (Target([u.rstrip("/") for u in args.url], args.admin_key, args.model),
                                           lambda: None)))
        for name, start in runs:
            run_dir = Path(tmp) / name
            run_dir.mkdir()
            t0 = time.perf_counter()
            target, stop = start(run_dir)
            log.info("%s: started in %.1f s: %s", name, time.perf_counter() - t0, target.urls)
            try:
                report["targets"].append(run_target(name, target, args, run_dir))
            finally:
                stop()
    report["total_s"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=2)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    log.info("\n%s", _table(report))
    failed = {f"{t['target']}/{n}": b["failures"] for t in report["targets"] for n, b in t["bursts"].items()
              if b["failures"]}
    if failed:
        log.error("FAILED: %s", json.dumps(failed))
        return 1
    log.info("every response was its reference or a 429/503 with Retry-After (%.0f s in all)", report["total_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
