"""Load test: C concurrent async clients for T seconds over P prefixes, every greedy answer checked.

    python -m bench.load --url http://127.0.0.1:8000 --admin-key KEY [--model M] [-c 64] [-t 60] [-p 200]
    python -m bench.load --cluster [--model M] ...          # starts scripts/cluster.sh, stops it afterwards
    make bench-load BENCH_LOAD_ARGS="--cluster -c 64 -t 60 -p 200"

1. set-up: a fresh tenant, P random prefixes of the served model uploaded, one request (its own prompt) per
   prefix plus a few on the base model;
2. references: each distinct request served alone, one at a time, greedy;
3. load: C clients, each sending requests chosen at random (a share of them streamed) to the servers in turn,
   until T seconds have passed; every answer is compared with its reference.

Reports throughput (requests/s, completion tokens/s), latency p50/p90/p99/max, time to first token of the
streamed requests, errors by status, and wrong answers. Exit status 1 when there were errors or wrong answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.load_setup import RequestSpec, Target, Workload, delete_tenant, prepare, start_cluster

log = logging.getLogger("bench.load")
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    completion_tokens: int = 0
    wrong: list[dict[str, str]] = field(default_factory=list)
    per_url: Counter[str] = field(default_factory=Counter)


def _body(spec: RequestSpec, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": spec.model, "prompt": spec.prompt, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


async def _send(client: httpx.AsyncClient, url: str, work: Workload, spec: RequestSpec, max_tokens: int,
                stream: bool) -> tuple[str, str, int, float | None]:
    """One completion: (status, text, completion tokens, seconds to the first text chunk if streamed)."""
    started = time.perf_counter()
    if not stream:
        r = await client.post(f"{url}/v1/completions", json=_body(spec, max_tokens, False), headers=work.headers)
        if r.status_code != 200:
            return str(r.status_code), r.text[:200], 0, None
        data = r.json()
        return "200", data["choices"][0]["text"], data["usage"]["completion_tokens"], None
    text, tokens, ttft = "", 0, None
    async with client.stream("POST", f"{url}/v1/completions", json=_body(spec, max_tokens, True),
                             headers=work.headers) as r:
        if r.status_code != 200:
            return str(r.status_code), (await r.aread()).decode()[:200], 0, None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                return "stream-error", json.dumps(chunk)[:200], 0, None
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("text") and ttft is None:
                    ttft = time.perf_counter() - started
                text += choice.get("text", "")
    return "200", text, tokens, ttft


async def _references(client: httpx.AsyncClient, target: Target, work: Workload, max_tokens: int) -> list[str]:
    """Every distinct request served alone (sequentially), as the ground truth for the load phase."""
    out = []
    for i, spec in enumerate(work.requests):
        status, text, _, _ = await _send(client, target.urls[i % len(target.urls)], work, spec, max_tokens, False)
        if status != "200":
            raise RuntimeError(f"reference request for {spec.model!r} failed: {status} {text}")
        out.append(text)
    return out


async def _client_loop(index: int, client: httpx.AsyncClient, target: Target, work: Workload, refs: list[str],
                       args: argparse.Namespace, deadline: float, res: Results) -> None:
    rng = random.Random(args.seed * 1000 + index)
    n = 0
    while time.perf_counter() < deadline:
        k = rng.randrange(len(work.requests))
        url = target.urls[(index + n) % len(target.urls)]
        stream = rng.random() < args.stream_ratio
        started = time.perf_counter()
        try:
            status, text, tokens, ttft = await _send(client, url, work, work.requests[k], args.max_tokens, stream)
        except httpx.HTTPError as exc:
            status, text, tokens, ttft = type(exc).__name__, str(exc), 0, None
        n += 1
        res.statuses[status] += 1
        res.per_url[url] += 1
        if status != "200":
            continue
        res.latencies.append(time.perf_counter() - started)
        res.completion_tokens += tokens
        if ttft is not None:
            res.ttfts.append(ttft)
        if text != refs[k]:
            res.wrong.append({"model": work.requests[k].model, "prompt": work.requests[k].prompt,
                              "expected": refs[k], "got": text, "stream": str(stream)})


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _report(args: argparse.Namespace, target: Target, res: Results, seconds: float) -> dict[str, Any]:
    ok = res.statuses.get("200", 0)
    ms = {f"p{q}": None if (v := _pct(res.latencies, q)) is None else round(v * 1e3, 1) for q in (50, 90, 99)}
    return {
        "config": {"concurrency": args.concurrency, "duration_s": args.duration, "prefixes": args.prefixes,
                   "virtual_tokens": args.virtual_tokens, "max_tokens": args.max_tokens,
                   "stream_ratio": args.stream_ratio, "model": target.model, "servers": target.urls},
        "requests": sum(res.statuses.values()), "ok": ok, "seconds": round(seconds, 2),
        "throughput_rps": round(ok / seconds, 2), "completion_tokens_per_s": round(res.completion_tokens / seconds, 1),
        "latency_ms": {**ms, "max": round(max(res.latencies, default=0.0) * 1e3, 1)},
        "ttft_ms_streamed": {f"p{q}": None if (v := _pct(res.ttfts, q)) is None else round(v * 1e3, 1)
                             for q in (50, 99)},
        "errors_by_status": {s: n for s, n in res.statuses.items() if s != "200"},
        "wrong_answers": len(res.wrong), "wrong_examples": res.wrong[:5], "per_server": dict(res.per_url),
    }


async def run(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
    with httpx.Client(timeout=120) as sync_client:
        t0 = time.perf_counter()
        work = prepare(sync_client, target, prefixes=args.prefixes, virtual_tokens=args.virtual_tokens,
                       seed=args.seed)
        log.info("set-up took %.1f s", time.perf_counter() - t0)
        try:
            async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
                t0 = time.perf_counter()
                refs = await _references(client, target, work, args.max_tokens)
                log.info("%d reference answers in %.1f s; load: %d clients for %.0f s", len(refs),
                         time.perf_counter() - t0, args.concurrency, args.duration)
                res = Results()
                started = time.perf_counter()
                deadline = started + args.duration
                await asyncio.gather(*(_client_loop(i, client, target, work, refs, args, deadline, res)
                                       for i in range(args.concurrency)))
                return _report(args, target, res, time.perf_counter() - started)
        finally:
            if not args.keep_tenant:
                delete_tenant(sync_client, target, work.tenant_id)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", action="append", help="a server (repeat for several replicas)")
    where.add_argument("--cluster", action="store_true", help="start scripts/cluster.sh for the run")
    p.add_argument("--admin-key", help="the servers' admin key (with --url)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the PREFIXSERVE_MODEL the servers run")
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("-t", "--duration", type=float, default=10.0, help="seconds of load")
    p.add_argument("-p", "--prefixes", type=int, default=20)
    p.add_argument("--virtual-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--stream-ratio", type=float, default=0.25, help="share of requests streamed (SSE)")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-tenant", action="store_true", help="leave the bench tenant and its prefixes")
    p.add_argument("--out", type=Path, help="write the report as JSON here too")
    args = p.parse_args(argv)
    if args.url and not args.admin_key:
        p.error("--url needs --admin-key")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = _parse(argv)
    stop = None
    if args.cluster:
        run_dir = Path(tempfile.mkdtemp(prefix="bench-load-cluster-"))
        target, stop = start_cluster(run_dir, args.model)
    else:
        target = Target([u.rstrip("/") for u in args.url], args.admin_key, args.model)
    try:
        report = asyncio.run(run(args, target))
    finally:
        if stop is not None:
            stop()
    text = json.dumps(report, indent=2)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if report["errors_by_status"] or report["wrong_answers"] else 0


if __name__ == "__main__":
    sys.exit(main())

