"""Quantized serving vs fp32: how often do the greedy tokens agree? (PREFIXSERVE_WEIGHTS, bench/RESULTS.md)

Held-out prompts: bench/e2e_data.py's 100 held-out meaning representations (seed 0), each as a plain completion
prompt (bench/quality.py's zero-shot instruction) and as a chat turn (the tokenizer's template): 200 rows, every
row generating `--new-tokens` greedy tokens. For each quantized mode it reports
- teacher-forced agreement: at every position, the quantized model's argmax given the fp32 model's own tokens so
  far, equal to the fp32 token (one divergence does not count twice);
- free-running agreement: tokens equal position by position when each mode continues its own output, and the
  share of rows whose whole output is identical;
- batch invariance: the first `--alone` rows served one at a time vs inside the batch (greedy tokens equal?).

    python -m bench.quant_agreement [--modes int4,int8] [--new-tokens 32] [--rows 200] [--batch 50]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from bench.e2e_data import generate

log = logging.getLogger("bench.quant_agreement")
INSTRUCTION = "Write one sentence that describes the restaurant, using every field.\n"  # bench/quality.py's


def _prompts(tokenizer: Any, rows: int) -> list[list[int]]:
    _, test = generate()
    plain = [tokenizer.encode(INSTRUCTION + e.prompt) for e in test]
    chat = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": INSTRUCTION + e.prompt}],
                                                           add_generation_prompt=True, tokenize=False))
            for e in test]
    return (plain + chat)[:rows]


def _decode(runner: Any, loaded: Any, prompts: list[list[int]], steps: int,
            forced: list[list[int]] | None = None) -> list[list[int]]:
    """Greedy argmax per step for each row; with `forced`, the batch advances on those tokens instead."""
    from app.engine.batch import Batch, NewRow
    from app.engine.quantized_decoder import KV_DTYPE
    from app.engine.runner import geometry_of
    from app.engine.sampling import SamplerState, SamplingParams

    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    rows = [NewRow(f"r{i}", p, None, SamplerState.create(params, loaded.device)) for i, p in enumerate(prompts)]
    kv_dtype = KV_DTYPE if runner.serving is not None else loaded.dtype
    batch = Batch.from_requests(rows, geometry=geometry_of(loaded.model, loaded.device, kv_dtype),
                                pad_token_id=int(loaded.tokenizer.pad_token_id))
    chosen: list[list[int]] = [[] for _ in prompts]
    for t in range(steps):
        own = runner.forward(batch).argmax(-1).tolist()
        for i, tok in enumerate(own):
            chosen[i].append(int(tok))
        batch.advance([f[t] for f in forced] if forced is not None else own)
    return chosen


def _batched(fn: Any, prompts: list[list[int]], size: int, *extra: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in range(0, len(prompts), size):
        out += fn(prompts[s : s + size], *[e[s : s + size] for e in extra])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--modes", default="int4,int8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--alone", type=int, default=16, help="rows also served one at a time (batch invariance)")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--out", default="bench/out/quant_agreement.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from app.engine.model import load_model
    from app.engine.quantized_decoder import build_quantized
    from app.engine.runner import ModelRunner

    torch.set_grad_enabled(False)
    loaded = load_model(args.model, data_dir=Path(args.data_dir))
    prompts = _prompts(loaded.tokenizer, args.rows)
    n = args.new_tokens
    t0 = time.perf_counter()
    fp32 = ModelRunner(loaded.model)
    ref = _batched(lambda p: _decode(fp32, loaded, p, n), prompts, args.batch)
    log.info("fp32 reference: %d rows x %d tokens in %.0f s", len(prompts), n, time.perf_counter() - t0)
    results: dict[str, Any] = {"args": vars(args)}
    lines = [f"{len(prompts)} held-out prompts x {n} greedy tokens, {args.model}",
             f"{'mode':<6}{'teacher-forced':>16}{'free-running':>14}{'rows identical':>16}{'alone = batched':>17}"]
    for mode in args.modes.split(","):
        runner = ModelRunner(loaded.model, build_quantized(loaded.model, mode, loaded.gguf_path))
        forced = _batched(lambda p, f, r=runner: _decode(r, loaded, p, n, f), prompts, args.batch, ref)
        free = _batched(lambda p, r=runner: _decode(r, loaded, p, n), prompts, args.batch)
        alone = [_decode(runner, loaded, [p], n)[0] for p in prompts[: args.alone]]
        total = len(prompts) * n
        tf = sum(a == b for fr, rr in zip(forced, ref, strict=True) for a, b in zip(fr, rr, strict=True)) / total
        fr_ = sum(a == b for fr, rr in zip(free, ref, strict=True) for a, b in zip(fr, rr, strict=True)) / total
        same_rows = sum(f == r for f, r in zip(free, ref, strict=True)) / len(prompts)
        inv = sum(a == f for a, f in zip(alone, free, strict=False))
        results[mode] = {"teacher_forced": tf, "free_running": fr_, "rows_identical": same_rows,
                         "alone_equals_batched": f"{inv}/{len(alone)}"}
        lines.append(f"{mode:<6}{tf:>16.1%}{fr_:>14.1%}{same_rows:>16.1%}{f'{inv}/{len(alone)}':>17}")
    log.info("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
