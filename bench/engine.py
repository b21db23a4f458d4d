"""Engine benchmark: 1, 8 and 32 concurrent streams, with different prefixes or none, in each serving weight mode,
beside llama.cpp on the same GGUF file when a build is found (--llama-cpp DIR or LLAMA_CPP_DIR).

Each row count N (`--repeat` rounds, the median reported): N requests arrive together, each with its own prefix
of 5-20 virtual tokens (real PEFT prefix-tuning adapters, saved and imported through our PEFT codec) or none,
16-token prompts (`--prompt-tokens`), `--new-tokens` greedy tokens each (EOS ignored, so every configuration
generates the same amount). tok/s = generated tokens / wall time from submission to the last token (prefill
included); TTFT from submission; ITL = a request's mean gap between tokens. Each weights mode runs in its own
process (its peak memory is its own), with and without prefixes on one engine, rounds interleaved; llama.cpp's
`llama-batched-bench` runs the same row counts, prompt and generation lengths (bench/llama_cpp.py). Prints a
table with the ratios and writes JSON. HF PEFT one request at a time (the earlier baseline) is an extra
configuration.

    python -m bench.engine [--rows 1,8,32] [--weights fp32,int4] [--new-tokens 64] [--prompt-tokens 16]
                           [--llama-cpp DIR] [--configs engine_prefixes,engine_no_prefix] [--model M]
                           [--threads T] [--out F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import llama_cpp

log = logging.getLogger("bench.engine")
CONFIGS = ("engine_prefixes", "engine_no_prefix")
# Not run by default (about 2 minutes each on 2 cores): HF PEFT one request at a time, on stock linears and on the
# oneDNN-packed ones the fp32 engine uses (how much of the gap is the kernel and how much is batching).
EXTRA_CONFIGS = ("peft_sequential", "peft_sequential_packed")
PROMPT_TOKENS = 16  # the default: short chat turns; --prompt-tokens for long prompts and long contexts
WORDS = ["river", "stone", "light", "quiet", "morning", "signal", "paper", "garden", "window", "number", "silver"]


def _prompts(tok: Any, n: int, length: int = PROMPT_TOKENS) -> list[list[int]]:
    """n different prompts of exactly `length` tokens."""
    out = []
    for i in range(n):
        text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 * length))
        ids = tok.encode(f"Write about {text}.")[:length]
        if len(ids) != length:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, expected {length}")
        out.append(ids)
    return out


def _summary(name: str, weights: str, n: int, timings: list[tuple[float, list[float]]], tokens: list[list[int]],
             wall: float) -> dict[str, Any]:
    ttfts = sorted(t for t, _ in timings)
    itls = sorted((ts[-1] - ts[0]) / (len(ts) - 1) for _, ts in timings if len(ts) > 1)
    return {"config": name, "weights": weights, "rows": n, "tokens": sum(len(t) for t in tokens), "wall_s": wall,
            "tok_s": sum(len(t) for t in tokens) / wall, "ttft_p50_s": statistics.median(ttfts),
            "itl_p50_ms": statistics.median(itls) * 1e3 if itls else 0.0, "outputs": tokens}


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median tok/s (its TTFT and ITL with it), and every round's tok/s."""
    ranked = sorted(rounds, key=lambda r: r["tok_s"])
    return {**ranked[len(ranked) // 2], "rounds_tok_s": [r["tok_s"] for r in rounds]}


async def _run_engine(engine: Any, prompts: list[list[int]], prefixes: list[Any],
                      new_tokens: int) -> tuple[list[tuple[float, list[float]]], list[list[int]], float]:
    """All requests at once: per request (TTFT, token arrival times), the tokens, and the wall time."""
    from app.engine.sampling import SamplingParams
    from app.engine.types import GenerationRequest

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> tuple[tuple[float, list[float]], list[int]]:
        t0 = time.perf_counter()
        stamps, toks = [], []
        async for ev in engine.submit(GenerationRequest(prompts[i], params, prefix=prefixes[i])):
            if ev.token_id is not None:
                stamps.append(time.perf_counter())
                toks.append(ev.token_id)
        return (stamps[0] - t0, stamps), toks

    await one(0)  # warm-up (allocator, first-call overheads) outside the measurement
    t0 = time.perf_counter()
    res = await asyncio.gather(*[one(i) for i in range(len(prompts))])
    wall = time.perf_counter() - t0
    return [r[0] for r in res], [r[1] for r in res], wall


def _setup(config: str, args: argparse.Namespace, tmp: Path) -> tuple[Any, list[tuple[str, Path, int]], list[Any]]:
    """The model, PEFT adapters saved under `tmp` (not for engine_no_prefix alone), and (engine_prefixes) the
    adapters imported as prefixes."""
    from app.engine.model import load_model
    from bench.peft_sequential import make_adapters
    from prefix_store.peft_codec import decode_peft

    loaded = load_model(args.model, data_dir=Path(args.data_dir), device=args.device, dtype=args.dtype)
    n = max(args.rows)
    adapters = make_adapters(loaded, n, tmp) if config != "engine_no_prefix" else []
    prefixes: list[Any] = [None] * n
    if config == "engine_prefixes":
        prefixes = [decode_peft((d / "adapter_config.json").read_bytes(),
                                (d / "adapter_model.safetensors").read_bytes(),
                                spec=loaded.spec, max_virtual_tokens=256, max_bytes=2**30)[0]
                    for _, d, _ in adapters]
    return loaded, adapters, prefixes


def _engine_rows(loaded: Any, configs: list[str], weights: str, prefixes: list[Any],
                 args: argparse.Namespace) -> list[dict[str, Any]]:
    """The engine configurations on one engine, their rounds interleaved (order swapped every round), so the
    prefix overhead is measured under the same conditions: a process's own speed varies by several percent."""
    from app.engine.factory import build_engine
    from app.threads import run_in_own_thread

    limit = max(64, *args.rows)
    # every row in one batch, as llama.cpp's context is sized for all of them (prefixes are at most 20 tokens)
    budget = max(32768, max(args.rows) * (args.prompt_tokens + args.new_tokens + 32))
    engine = run_in_own_thread(lambda: build_engine(loaded, packed_linears=not args.unpacked, weights=weights,
                                                    max_batch_rows=limit, max_batch_tokens=budget))
    engine.start()
    label = weights if weights != "fp32" else str(loaded.dtype).removeprefix("torch.")  # the weights as loaded
    out = []
    try:
        for n in args.rows:
            prompts = _prompts(loaded.tokenizer, n, args.prompt_tokens)
            rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
            for i in range(args.repeat):
                for config in configs if i % 2 == 0 else configs[::-1]:
                    rows_prefixes = prefixes[:n] if config == "engine_prefixes" else [None] * n
                    result = asyncio.run(_run_engine(engine, prompts, rows_prefixes, args.new_tokens))
                    rounds[config].append(_summary(config, label, n, *result))
            out += [_median_round(r) for r in rounds.values()]
    finally:
        engine.stop()
    return out


def _child(configs: list[str], weights: str, args: argparse.Namespace, conn: Any) -> None:
    from app.threads import run_in_own_thread
    from bench.peft_sequential import peft_sequential

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # As the server does (app/threads.py): set-up on a thread that ends, so its OpenMP pool does not
        # outlive it and slow the engine thread.
        setup_as = "engine_prefixes" if "engine_prefixes" in configs else configs[0]
        loaded, adapters, prefixes = run_in_own_thread(lambda: _setup(setup_as, args, Path(tmp)))
        if configs[0].startswith("peft_sequential"):
            if configs[0] == "peft_sequential_packed":
                from app.engine.packed_linear import pack_linears

                pack_linears(loaded.model)  # before PEFT loads: only the base model's linears
            for n in args.rows:
                prompts = _prompts(loaded.tokenizer, n, args.prompt_tokens)
                res, wall = peft_sequential(loaded, adapters[:n], prompts, args.new_tokens)
                timings = [(ttft, [0.0]) for ttft, _ in res]
                rows.append(_summary(configs[0], str(loaded.dtype).removeprefix("torch."), n, timings,
                                     [t for _, t in res], wall))
        else:
            rows = _engine_rows(loaded, configs, weights, prefixes, args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    conn.send([{**r, "peak_mem_bytes": peak} for r in rows])


def _paired(no_prefix: list[float], prefixes: list[float]) -> str:
    """The overhead round by round: the two configurations' rounds ran back to back, so a pair shares the machine's
    state, and a slow stretch of a shared VM moves both (the ratio of the medians above can pair unlike rounds)."""
    if len(no_prefix) != len(prefixes) or len(prefixes) < 2:
        return ""
    each = sorted(a / b - 1 for a, b in zip(no_prefix, prefixes, strict=True))
    return f" (paired rounds: median {statistics.median(each):+.0%}, {each[0]:+.0%} to {each[-1]:+.0%})"


def _ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Per row count: each engine mode over llama.cpp, and the cost of prefixes (no prefix over prefixes)."""
    by = {(r["config"], r["weights"], r["rows"]): r["tok_s"] for r in rows}
    rounds = {(r["config"], r["weights"], r["rows"]): r.get("rounds_tok_s", []) for r in rows}
    lines = []
    for n in sorted({r["rows"] for r in rows}):
        parts = []
        for (config, weights, m), tok_s in sorted(by.items()):
            if m != n or config != "engine_prefixes":
                continue
            if ("llama.cpp", "gguf", n) in by:
                parts.append(f"{weights} prefixes / llama.cpp {tok_s / by[('llama.cpp', 'gguf', n)]:.2f}x")
            if ("engine_no_prefix", weights, n) in by:
                parts.append(f"{weights} prefix overhead {by[('engine_no_prefix', weights, n)] / tok_s - 1:+.0%}"
                             + _paired(rounds[("engine_no_prefix", weights, n)], rounds[(config, weights, n)]))
        if parts:
            lines.append(f"rows {n:>3}: " + "; ".join(parts))
    return lines


def _llama_cpp(args: argparse.Namespace, threads: int) -> list[dict[str, Any]]:
    binary = llama_cpp.find_binary(args.llama_cpp)
    gguf = llama_cpp.gguf_file(args.model)
    if binary is None or gguf is None:
        log.info("llama.cpp: %s", "no GGUF file for this model" if binary else "not run (set LLAMA_CPP_DIR)")
        return []
    runs = [llama_cpp.run(binary, gguf, args.rows, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                          threads=threads) for _ in range(args.repeat)]
    log.info("llama.cpp: %s%s", " ".join(runs[0]["command"]),
             " (AMX unusable here: --no-repack)" * runs[0]["no_repack"])
    return [_median_round([{"config": "llama.cpp", "weights": "gguf", "rows": n, "tokens": n * args.new_tokens,
                            "peak_mem_bytes": 0, **run["rows"][n]} for run in runs]) for n in args.rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--rows", default="1,8,32", help="concurrent requests, one measurement each")
    ap.add_argument("--weights", default="fp32,int4",
                    help="serving weight modes of the engine configurations (fp32: the float weights as loaded)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                    help="tokens per prompt (long prompts: the time to first token, and decoding at a long context)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="rounds per measurement; the median round is reported (5: a one-row round lasts ~1 s, "
                         "and with 3 the one-row ratio to llama.cpp moved 0.57x-0.79x between runs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch and llama.cpp threads (default: torch's)")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"also: {', '.join(EXTRA_CONFIGS)}")
    ap.add_argument("--llama-cpp", default=None, help="llama.cpp build directory (default: $LLAMA_CPP_DIR)")
    ap.add_argument("--unpacked", action="store_true", help="fp32 engine without oneDNN-packed linears (CPU)")
    ap.add_argument("--out", default="bench/out/engine.json")
    args = ap.parse_args()
    args.rows = [int(n) for n in args.rows.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = args.threads or torch.get_num_threads()
    load_start = os.getloadavg()
    rows: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    configs = args.configs.split(",")
    engine_configs = [c for c in configs if c.startswith("engine")]
    runs = [(engine_configs, w) for w in args.weights.split(",")] if engine_configs else []
    runs += [([c], "fp32") for c in configs if not c.startswith("engine")]
    for run_configs, weights in runs:  # each in its own process: its own peak memory
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(run_configs, weights, args, child))
        proc.start()
        got = parent.recv()
        proc.join()
        log.info("%s", "; ".join(f"{r['config']} {r['weights']} rows {r['rows']}: {r['tok_s']:.1f} tok/s" for r in got))
        rows += got
    rows += _llama_cpp(args, threads) if args.device == "cpu" else []
    load_end = os.getloadavg()
    lines = [
        f"model={args.model} new_tokens={args.new_tokens} prompt_tokens={args.prompt_tokens} device={args.device} "
        f"machine={platform.machine()} threads={threads} torch={torch.__version__}; load average (1 min) "
        f"{load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end",
        f"{'rows':>4}  {'config':<24}{'weights':<8}{'tok/s':>9}{'TTFT p50':>10}{'ITL p50':>10}{'peak MiB':>10}"
        f"{'wall s':>8}",
    ]
    for r in sorted(rows, key=lambda r: (r["rows"], r["config"], r["weights"])):
        lines.append(f"{r['rows']:>4}  {r['config']:<24}{r['weights']:<8}{r['tok_s']:>9.1f}{r['ttft_p50_s']:>9.2f}s"
                     f"{r['itl_p50_ms']:>8.1f}ms{r['peak_mem_bytes'] / 2**20:>10.0f}{r['wall_s']:>8.1f}")
    ratios = _ratios(rows)
    by = {(r["config"], r["rows"]): r for r in rows if r["weights"] not in ("int4", "int8", "gguf")}
    for n in args.rows:
        eng, peft = by.get(("engine_prefixes", n)), by.get(("peft_sequential", n))
        if eng and peft:
            same = sum(a == b for a, b in zip(eng["outputs"], peft["outputs"], strict=True))
            ratios.append(f"rows {n:>3}: {eng['weights']} prefixes / PEFT one at a time "
                          f"{eng['tok_s'] / peft['tok_s']:.2f}x, identical greedy tokens {same}/{n}")
    log.info("\n".join(lines + ratios))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r.pop("outputs", None)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows, "ratios": ratios,
                                          "load_average": {"start": load_start, "end": load_end}}, indent=2))


if __name__ == "__main__":
    main()
