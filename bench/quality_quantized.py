"""Does a prefix trained on the float weights keep its exact match when served on quantized weights?

Trains one prefix through the HTTP API on a `prefixserve serve` in the default `PREFIXSERVE_WEIGHTS=fp32` mode
(bench/quality.py's data-to-text task, its training recipe and held-out set), scores it there, then restarts the
server on the same data directory in each quantized mode (`int4`, `int8`: the same prefix, the same held-out
prompts) and scores it again. Training always runs on the float weights (README "Quantized serving on a CPU"), so
this is exactly what a tenant gets who trains on one replica and is served by a quantized one. Also reports, per
mode, how many held-out answers are identical to the fp32 mode's.

    python -m bench.quality_quantized [--modes int4,int8] [--steps 150] [--out bench/out/quality_quantized.json]
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
from pathlib import Path
from typing import Any

import httpx

from bench.e2e_data import Example, generate, score
from bench.quality import _complete_all, _free_port, _start_server, _train_ours, create_tenant

log = logging.getLogger("bench.quality_quantized")


async def _score_mode(data_dir: Path, mode: str, key: str | None, test: list[Example],
                      train: list[Example] | None, args: argparse.Namespace) -> dict[str, Any]:
    """Start a server on `data_dir` in weight mode `mode`; train first when `train` is given (fp32 only)."""
    port = _free_port()
    proc = _start_server(data_dir, port, {"PREFIXSERVE_WEIGHTS": mode})
    out: dict[str, Any] = {"mode": mode}
    try:
        base = f"http://127.0.0.1:{port}"
        if key is None:
            key = await create_tenant(base)
        out["key"] = key
        async with httpx.AsyncClient(base_url=base, timeout=3600,
                                     headers={"Authorization": f"Bearer {key}"}) as client:
            args.base_model = (await client.get("/v1/models")).json()["data"][0]["id"]
            if train is not None:
                train_jsonl = "".join(json.dumps(e.record()) + "\n" for e in train).encode()
                out["training"] = await _train_ours(client, train_jsonl, args)
                args.prefix_model = out["training"]["model"]
                log.info("trained on the float weights: %s", out["training"])
            t0 = time.perf_counter()
            out["hyps"] = await _complete_all(client, args.prefix_model, [e.prompt for e in test], 64)
            out["score_wall_s"] = time.perf_counter() - t0
            out |= score(out["hyps"], [e.completion for e in test])
            log.info("%s: exact match %.1f%%, BLEU %.1f", mode, out["exact_match"], out["bleu"])
    finally:
        proc.terminate()
        proc.wait(30)
    return out


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    train, test = generate(args.train, args.test, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        fp32 = await _score_mode(data_dir, "fp32", None, test, train, args)
        results = {"fp32": fp32}
        for mode in args.modes.split(","):
            r = await _score_mode(data_dir, mode, fp32["key"], test, None, args)
            r["same_answer_as_fp32_pct"] = 100.0 * sum(
                a == b for a, b in zip(r["hyps"], fp32["hyps"], strict=True)) / len(test)
            r["exact_match_delta_points"] = r["exact_match"] - fp32["exact_match"]
            results[mode] = r
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="int4,int8")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--num-virtual-tokens", type=int, default=16)
    ap.add_argument("--prefix-projection", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out/quality_quantized.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = asyncio.run(_run(args))
    lines = [f"prefix trained on fp32 weights ({args.steps} steps, {args.train} examples), served per weight mode "
             f"on {args.test} held-out examples; machine={platform.machine()} cpus={os.cpu_count()}",
             f"{'weights':<10}{'exact %':>9}{'BLEU':>8}{'Δ exact (points)':>18}{'same answer as fp32 %':>24}"]
    for mode, r in results.items():
        delta = f"{r['exact_match_delta_points']:+.1f}" if mode != "fp32" else "-"
        same = f"{r['same_answer_as_fp32_pct']:.1f}" if mode != "fp32" else "-"
        lines.append(f"{mode:<10}{r['exact_match']:>9.1f}{r['bleu']:>8.1f}{delta:>18}{same:>24}")
    log.info("\n".join(lines))
    for r in results.values():
        r.pop("key", None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
