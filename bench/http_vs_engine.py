"""HTTP path vs engine alone: the same concurrent workload through the engine object and through one server.

    python -m bench.http_vs_engine [--sizes 32,64] [--new-tokens 64] [--repeats 3] [--no-profile] [--out F]
    make bench-http

In one run, on the embedded model with default settings:
1. engine alone (a child process, as bench/engine.py does): the server's own model loader and engine factory
   on a default `Settings`, N concurrent rows (N in --sizes), each with its own random prefix of 5-20 virtual
   tokens, a ~20-token prompt, --new-tokens greedy tokens with EOS ignored; after one warm-up request;
2. HTTP: `prefixserve serve` on its defaults (temp data dir, SQLite, free port), the same prefixes uploaded,
   the same N prompts as N concurrent streaming /v1/completions requests (max_tokens = --new-tokens,
   `ignore_eos`, temperature 0) after one warm-up request;
   engine and HTTP rounds alternate, --repeats times per N, and the medians are compared: this machine's
   speed moves with whatever else runs on it, and alternating spreads that over both sides;
3. profile: py-spy samples the server process (every thread, idle samples dropped, non-blocking so it does
   not pause the server) while the HTTP workload at the largest N runs again; the samples are split by thread
   and, outside the model forward, by what the code does (authentication, database, JSON, SSE framing,
   detokenization, HTTP protocol, asyncio, ...). Nothing in app/ is changed or imported by the server for it.

Prints tokens/s for both and HTTP/engine (target >= 0.9), whether the greedy texts agree, and the profile
summary; writes JSON (with the raw py-spy stacks next to it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

from bench.load_setup import ROOT, Target, create_tenant, delete_tenant, start_embedded

log = logging.getLogger("bench.http_vs_engine")
MODEL = "embedded:smollm2-135m-instruct"
WORDS = ("river", "stone", "light", "quiet", "morning", "signal", "paper", "garden", "window", "number", "silver",
         "travel")


def prompts(n: int) -> list[str]:
    """n distinct ~20-token prompts (bench/engine.py's words, as text so the server tokenizes them itself)."""
    return [f"Write about {' '.join(WORDS[(i + k) % len(WORDS)] for k in range(16))} {i}." for i in range(n)]


def _pcts(values: list[float]) -> dict[str, float]:
    if len(values) == 1:
        return {"p50": values[0], "p99": values[0]}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49], "p99": q[98]}


# ---------------------------------------------------------------------------------------------------- engine


def _engine_child(n_max: int, new_tokens: int, conn: Any) -> None:
    """Engine alone on default settings. Sends the native prefix blobs, then runs one round of N concurrent
    rows per ("run", N) it receives and sends its result, until ("stop",)."""
    # The server runs on its defaults: the engine here must too, whatever PREFIXSERVE_* the shell has.
    for key in [k for k in os.environ if k.startswith("PREFIXSERVE_")]:
        del os.environ[key]
    import torch

    from app.config import Settings
    from app.engine.factory import build_engine
    from app.engine.sampling import SamplingParams
    from app.engine.types import GenerationRequest
    from app.runtime import engine_options, load_base_model
    from app.threads import run_in_own_thread
    from prefix_store.codec import decode_native, encode_native
    from prefix_store.types import PrefixKV

    settings = Settings(data_dir=ROOT / "data")  # the shared converted-model cache; nothing else is written
    # As the server does (app/runtime.py): load and build on threads that end, so no OpenMP pool outlives them.
    loaded = run_in_own_thread(lambda: load_base_model(settings, torch_threads=settings.torch_threads))
    engine = run_in_own_thread(lambda: build_engine(loaded, **engine_options(settings)))
    engine.start()
    spec = loaded.spec

    def make_prefixes() -> tuple[list[bytes], list[PrefixKV]]:
        gen = torch.Generator().manual_seed(0)
        blobs = []
        for i in range(n_max):
            shape = (spec.num_layers, spec.num_kv_heads, 5 + (i * 7) % 16, spec.head_dim)  # 5..20 virtual tokens
            blobs.append(encode_native(PrefixKV(keys=torch.randn(shape, generator=gen),
                                                values=torch.randn(shape, generator=gen),
                                                base_fingerprint=spec.fingerprint,
                                                created_by="bench.http_vs_engine")))
        # Decoded from the same bytes the server will store, so both sides serve identical prefixes.
        return blobs, [decode_native(b, spec=spec, max_virtual_tokens=256, max_bytes=2**30) for b in blobs]

    # Torch work off the engine thread runs on a thread that ends, as in the server: a measured first version
    # of this bench made the prefixes on the main thread and its engine was slower than the server's.
    blobs, prefixes = run_in_own_thread(make_prefixes)
    ids = [list(loaded.tokenizer.encode(t)) for t in prompts(n_max)]  # as the server's EngineClient.encode_prompt
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, t0: float) -> tuple[float, list[int], str]:
        ttft, toks, text = 0.0, list[int](), list[str]()
        async for ev in engine.submit(GenerationRequest(ids[i], params, prefix=prefixes[i])):
            if ev.token_id is not None:
                if not toks:
                    ttft = time.perf_counter() - t0
                toks.append(ev.token_id)
            text.append(ev.text)
        return ttft, toks, "".join(text)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        await one(0, time.perf_counter())  # warm-up (first-call overheads) outside the measurement
        conn.send({"blobs": blobs, "torch": torch.__version__, "torch_threads": torch.get_num_threads()})
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd[0] == "stop":
                return
            n = cmd[1]
            t0 = time.perf_counter()
            res = await asyncio.gather(*[one(i, t0) for i in range(n)])
            wall = time.perf_counter() - t0
            tokens = sum(len(t) for _, t, _ in res)
            conn.send({"n": n, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "errors": 0,
                       "ttft_s": _pcts([r[0] for r in res]), "texts": [r[2] for r in res]})

    asyncio.run(serve())
    engine.stop()


class EngineProcess:
    """The engine-alone side in its own process (its torch state, threads and memory apart from the server's),
    kept alive so its rounds can alternate with the HTTP rounds."""

    def __init__(self, n_max: int, new_tokens: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_child, args=(n_max, new_tokens, child))
        self.proc.start()
        self.info: dict[str, Any] = self.conn.recv()

    def round(self, n: int) -> dict[str, Any]:
        self.conn.send(("run", n))
        out: dict[str, Any] = self.conn.recv()
        return out

    def stop(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("stop",))
            self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()


# ------------------------------------------------------------------------------------------------------ HTTP


async def _stream_one(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, Any],
                      t0: float) -> tuple[float, int, str, str | None]:
    """One streamed completion: (seconds to the first text chunk from t0, completion tokens, text, error)."""
    ttft, tokens, parts = 0.0, 0, list[str]()
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            # Counted, not retried: a refused request is part of what the HTTP path costs at this concurrency.
            return 0.0, 0, "", f"{r.status_code}: {(await r.aread()).decode()[:200]}"
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    if not parts:
                        ttft = time.perf_counter() - t0
                    parts.append(choice["text"])
    return ttft, tokens, "".join(parts), None


async def http_round(target: Target, key: str, n: int, new_tokens: int) -> dict[str, Any]:
    texts = prompts(n)
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        bodies = [{"model": f"hve-{i}", "prompt": texts[i], "max_tokens": new_tokens, "temperature": 0,
                   "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}} for i in range(n)]
        t0 = time.perf_counter()
        res = await asyncio.gather(*[_stream_one(client, target.urls[0], headers, b, t0) for b in bodies])
        wall = time.perf_counter() - t0
    tokens = sum(r[1] for r in res)
    errors = [r[3] for r in res if r[3]]
    if errors:
        log.warning("HTTP, %d streams: %d refused (%s)", n, len(errors), Counter(errors).most_common(2))
    return {"n": n, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "errors": len(errors),
            "error_kinds": dict(Counter(errors)), "ttft_s": _pcts([r[0] for r in res if not r[3]] or [0.0]),
            "texts": [r[2] for r in res]}


def upload(target: Target, key: str, blobs: list[bytes]) -> None:
    with httpx.Client(timeout=120) as client:
        for i, blob in enumerate(blobs):
            r = client.post(f"{target.urls[0]}/v1/prefixes", headers={"Authorization": f"Bearer {key}"},
                            data={"name": f"hve-{i}"},
                            files={"file": (f"hve-{i}.safetensors", blob, "application/octet-stream")})
            r.raise_for_status()


# --------------------------------------------------------------------------------------------------- profile

# What a sample's code is doing, decided by its innermost frame that matches a rule (first rule wins per
# frame): so SQLAlchemy under the auth dependency counts as database, hashing in app/services/auth.py as auth.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("model forward (torch)", ("torch/nn/", "transformers/", "app/engine/packed_linear.py", "torch/_ops.py",
                               "torch/utils/")),
    ("database (SQLAlchemy, driver, db thread pool)", ("sqlalchemy/", "sqlite3/", "psycopg/",
                                                       "app/services/db_calls.py", "app/db/")),
    ("authentication / access", ("app/services/auth.py", "app/services/access.py", "app/api/deps.py", "hashlib",
                                 "hmac")),
    ("detokenization", ("app/engine/detok.py", "tokenizers/", "tokenization_utils")),
    ("sampling", ("app/engine/sampling.py",)),
    ("SSE framing (sse_starlette)", ("sse_starlette/",)),
    ("JSON / pydantic (request parse, response dump)", ("json/", "pydantic/", "pydantic_core/", "fastapi/encoders",
                                                        "model_dump_json")),
    ("metrics / access log", ("prometheus_client/", "app/observability/", "logging/")),
    ("prefix resolver / store", ("prefix_store/",)),
    ("engine scheduling / batch bookkeeping", ("app/engine/",)),
    ("completion service (app/services)", ("app/services/",)),
    ("FastAPI / Starlette routing, middleware", ("fastapi/", "starlette/", "app/api/", "app/main.py",
                                                 "app/middleware")),
    ("HTTP protocol (uvicorn, httptools/h11)", ("uvicorn/", "httptools/", "h11/")),
    ("asyncio event loop / thread hand-offs", ("asyncio/", "concurrent/futures", "threading.py", "anyio/", "queue.py",
                                               "selectors.py")),
]


def _bucket(frames: list[str]) -> str:
    for frame in reversed(frames):  # innermost first
        for name, needles in BUCKETS:
            if any(n in frame for n in needles):
                return name
    return "other"


def _thread_group(root: str) -> str:
    """The thread a raw py-spy stack belongs to: its root frame is 'thread (<tid>): <name>'."""
    name = root.partition("): ")[2] or root
    if name == "engine":
        return "engine thread"
    if name.startswith("db"):
        return "db threads (app/services/db_calls.py)"
    if name in ("MainThread", "process"):
        return "event loop (MainThread)"
    if "AnyIO" in name or "asyncio" in name or name.startswith("ThreadPoolExecutor"):
        return "anyio / executor threads"
    return f"other threads ({name})"


def analyse(raw_path: Path) -> dict[str, Any]:
    """Split py-spy's collapsed stacks (`--format raw --threads`) by thread and by bucket; top functions."""
    by_thread: Counter[str] = Counter()
    by_bucket: dict[str, Counter[str]] = defaultdict(Counter)
    self_fn: dict[str, Counter[str]] = defaultdict(Counter)
    app_incl: dict[str, Counter[str]] = defaultdict(Counter)
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        parts = stack.split(";")
        if parts and parts[0].startswith("process "):
            parts = parts[1:]
        thread = _thread_group(parts[0]) if parts else "unknown"
        frames = parts[1:]
        total += count
        by_thread[thread] += count
        by_bucket[thread][_bucket(frames)] += count
        if frames:
            self_fn[thread][frames[-1]] += count
        for frame in set(frames):
            if "app/" in frame or "prefix_store/" in frame:
                app_incl[thread][frame] += count

    def pct(n: int) -> float:
        return round(100.0 * n / total, 1) if total else 0.0

    return {
        "samples": total,
        "threads": {t: {"samples": n, "pct_of_all": pct(n),
                        "buckets": {b: {"samples": m, "pct_of_all": pct(m)}
                                    for b, m in by_bucket[t].most_common()},
                        "top_self": [{"frame": f, "pct_of_all": pct(m)} for f, m in self_fn[t].most_common(15)],
                        "top_app_inclusive": [{"frame": f, "pct_of_all": pct(m)}
                                              for f, m in app_incl[t].most_common(15)]}
                    for t, n in by_thread.most_common()},
    }


def profile_http(server_pid: int, target: Target, key: str, n: int, new_tokens: int, rounds: int,
                 out_raw: Path) -> dict[str, Any]:
    """py-spy on the server while `rounds` HTTP rounds of n requests run; the rounds' throughput too."""
    cmd = [str(ROOT / ".venv" / "bin" / "py-spy"), "record", "--pid", str(server_pid), "--threads", "--nonblocking",
           "--format", "raw", "--rate", "100", "--output", str(out_raw)]
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(2)  # py-spy attaches and starts sampling
    if spy.poll() is not None:
        raise RuntimeError(f"py-spy failed: {spy.stderr.read().decode() if spy.stderr else ''}")
    try:
        rounds_out = [asyncio.run(http_round(target, key, n, new_tokens)) for _ in range(rounds)]
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
        _, err = spy.communicate(timeout=120)
    if not out_raw.exists():
        raise RuntimeError(f"py-spy wrote nothing: {err.decode()[-500:]}")
    result = analyse(out_raw)
    result["rounds_tok_s"] = [round(r["tok_s"], 1) for r in rounds_out]
    result["rounds_errors"] = [r["error_kinds"] for r in rounds_out]
    return result


# ------------------------------------------------------------------------------------------------------ main


def _report_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"{'N':>4}{'engine tok/s':>14}{'HTTP tok/s':>12}{'HTTP/engine':>13}{'engine TTFT p50':>17}"
             f"{'HTTP TTFT p50':>15}{'same text':>11}  per-repeat HTTP/engine; HTTP errors"]
    for row in report["comparison"]:
        lines.append(f"{row['n']:>4}{row['engine_tok_s']:>14.1f}{row['http_tok_s']:>12.1f}{row['ratio']:>12.2f}x"
                     f"{row['engine_ttft_p50_s']:>16.2f}s{row['http_ttft_p50_s']:>14.2f}s"
                     f"{row['same_text']:>8}/{row['n']}  {row['pair_ratios']}; {row['http_errors']}")
    lines.append(f"medians of {report['comparison'][0]['rounds'] if report['comparison'] else 0} alternating rounds; "
                 f"1-min load average over the run: {report['loadavg_1m']}")
    prof = report.get("profile")
    if prof:
        lines.append(f"profile: {prof['samples']} samples of non-idle threads at 100 Hz during "
                     f"{len(prof['rounds_tok_s'])} rounds of N={report['profile_n']} ({prof['rounds_tok_s']} tok/s, "
                     f"refused: {prof['rounds_errors']})")
        for t, d in prof["threads"].items():
            if d["pct_of_all"] < 0.1:
                continue  # short-lived or idle threads
            lines.append(f"  {t}: {d['pct_of_all']}% of samples")
            for b, m in list(d["buckets"].items())[:8]:
                lines.append(f"      {m['pct_of_all']:>5.1f}%  {b}")
    return lines


def _compare(n: int, eng: list[dict[str, Any]], http: list[dict[str, Any]]) -> dict[str, Any]:
    e_tok = [r["tok_s"] for r in eng]
    h_tok = [r["tok_s"] for r in http]
    return {
        "n": n, "rounds": len(eng), "engine_tok_s": statistics.median(e_tok), "http_tok_s": statistics.median(h_tok),
        "ratio": statistics.median(h_tok) / statistics.median(e_tok),
        "pair_ratios": [round(h / e, 3) for e, h in zip(e_tok, h_tok, strict=True)],
        "engine_tok_s_all": [round(v, 1) for v in e_tok], "http_tok_s_all": [round(v, 1) for v in h_tok],
        "engine_ttft_p50_s": statistics.median(r["ttft_s"]["p50"] for r in eng),
        "engine_ttft_p99_s": statistics.median(r["ttft_s"]["p99"] for r in eng),
        "http_ttft_p50_s": statistics.median(r["ttft_s"]["p50"] for r in http),
        "http_ttft_p99_s": statistics.median(r["ttft_s"]["p99"] for r in http),
        "http_errors": sum(r["errors"] for r in http),
        "same_text": sum(a == b for a, b in zip(eng[0]["texts"], http[0]["texts"], strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32,64", help="comma-separated numbers of concurrent requests")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3,
                    help="engine and HTTP rounds alternate this many times per size (medians are reported)")
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy phase")
    ap.add_argument("--profile-rounds", type=int, default=2, help="HTTP rounds at the largest size under py-spy")
    ap.add_argument("--out", type=Path, default=Path("bench/out/http_vs_engine.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    args.out.parent.mkdir(parents=True, exist_ok=True)

    engine = EngineProcess(max(sizes), args.new_tokens)
    report: dict[str, Any] = {"model": MODEL, "sizes": sizes, "new_tokens": args.new_tokens,
                              "torch": engine.info["torch"], "torch_threads": engine.info["torch_threads"],
                              "comparison": [], "loadavg_1m": [round(os.getloadavg()[0], 2)]}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
            server = start_embedded(Path(tmp) / "data", MODEL)
            try:
                with httpx.Client(timeout=60) as client:
                    tenant_id, key = create_tenant(client, server.target, f"bench-http-{os.getpid()}")
                upload(server.target, key, engine.info["blobs"])
                asyncio.run(http_round(server.target, key, 1, args.new_tokens))  # warm-up, as the engine's
                eng_rounds: dict[int, list[dict[str, Any]]] = defaultdict(list)
                http_rounds: dict[int, list[dict[str, Any]]] = defaultdict(list)
                # Engine and HTTP rounds alternate (and swap order each repeat) so that other work on the machine,
                # which comes and goes, weighs on both sides alike.
                for rep in range(args.repeats):
                    for n in sizes:
                        for side in (("engine", "http") if rep % 2 == 0 else ("http", "engine")):
                            if side == "engine":
                                r = engine.round(n)
                                eng_rounds[n].append(r)
                            else:
                                r = asyncio.run(http_round(server.target, key, n, args.new_tokens))
                                http_rounds[n].append(r)
                            log.info("repeat %d, %s, N=%d: %d tokens in %.2f s = %.1f tok/s (load %.2f)", rep, side,
                                     n, r["tokens"], r["wall_s"], r["tok_s"], os.getloadavg()[0])
                        report["loadavg_1m"].append(round(os.getloadavg()[0], 2))
                engine.stop()  # nothing else on the engine side: its process leaves the CPUs to the profile
                report["comparison"] = [_compare(n, eng_rounds[n], http_rounds[n]) for n in sizes]
                if not args.no_profile:
                    report["profile_n"] = max(sizes)
                    raw = args.out.with_suffix(".pyspy.txt")
                    report["profile"] = profile_http(server.proc.pid, server.target, key, max(sizes),
                                                     args.new_tokens, args.profile_rounds, raw)
                    report["profile_raw"] = str(raw)
                with httpx.Client(timeout=60) as client:
                    delete_tenant(client, server.target, tenant_id)
            finally:
                server.stop()
    finally:
        engine.stop()
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("\n%s", "\n".join(_report_lines(report)))
    log.info("report: %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
