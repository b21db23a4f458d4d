"""Engine benchmark: heterogeneous prefixes vs no prefixes vs HF PEFT one request at a time.

N concurrent requests, each with its own prefix of 5-20 virtual tokens (real PEFT prefix-tuning adapters, saved
and imported through our PEFT codec), ~20-token prompts, `--new-tokens` greedy tokens each (EOS ignored so
every configuration generates the same amount). Each configuration runs in its own process so peak memory is its
own. Prints a table and writes JSON.

    python -m bench.engine [--model M] [--n 32] [--new-tokens 64] [--device cpu] [--dtype auto] [--out F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("bench.engine")
CONFIGS = ("engine_prefixes", "engine_no_prefix", "peft_sequential")
# Not run by default: PEFT one at a time on the same oneDNN-packed linear layers the engine uses on CPU, to show
# how much of (1)/(3) is the kernel and how much is batching.
EXTRA_CONFIGS = ("peft_sequential_packed",)


def _adapters(loaded: Any, n: int, workdir: Path) -> list[tuple[str, Path, int]]:
    """Create n PEFT prefix-tuning adapters with random (small) prompt embeddings; return (name, dir, P)."""
    from peft import PrefixTuningConfig, get_peft_model

    out = []
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        p = 5 + (i * 7) % 16  # 5..20 virtual tokens
        cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p)
        pm = get_peft_model(loaded.model, cfg)
        emb = pm.prompt_encoder["default"].embedding.weight
        with torch.no_grad():
            emb.copy_(torch.randn(emb.shape, generator=gen) * 0.5)
        d = workdir / f"a{i}"
        pm.save_pretrained(d)
        out.append((f"a{i}", d, p))
    return out


def _prompts(tok: Any, n: int) -> list[list[int]]:
    words = [
        "river",
        "stone",
        "light",
        "quiet",
        "morning",
        "signal",
        "paper",
        "garden",
        "window",
        "number",
        "silver",
        "travel",
    ]
    out = []
    for i in range(n):
        text = " ".join(words[(i + k) % len(words)] for k in range(16))
        out.append(tok.encode(f"Write about {text}.")[:20])
    return out


def _summary(
    name: str, ttfts: list[float], tokens: int, wall: float, outputs: list[list[int]]
) -> dict[str, Any]:
    q = statistics.quantiles(ttfts, n=100, method="inclusive") if len(ttfts) > 1 else [ttfts[0]] * 99
    peak = (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "config": name,
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "ttft_p50_s": q[49],
        "ttft_p99_s": q[98],
        "peak_mem_bytes": peak,
        "outputs": outputs,
    }


async def _run_engine(
    loaded: Any, prompts: list[list[int]], prefixes: list[Any], new_tokens: int, *, packed: bool
) -> Any:
    from app.engine.factory import build_engine
    from app.engine.sampling import SamplingParams
    from app.engine.types import GenerationRequest
    from app.threads import run_in_own_thread

    rows = max(64, len(prompts))
    engine = run_in_own_thread(lambda: build_engine(loaded, packed_linears=packed, max_batch_rows=rows))
    engine.start()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        ttft, toks = 0.0, []
        async for ev in engine.submit(GenerationRequest(prompts[i], params, prefix=prefixes[i])):
            if ev.token_id is not None:
                if not toks:
                    ttft = time.perf_counter() - t0
                toks.append(ev.token_id)
        return ttft, toks

    # warm-up (allocator, first-call overheads) outside the measurement
    await one(0)
    t0 = time.perf_counter()
    res = await asyncio.gather(*[one(i) for i in range(len(prompts))])
    wall = time.perf_counter() - t0
    engine.stop()
    return res, wall


def _peft_sequential(
    loaded: Any, adapters: list[tuple[str, Path, int]], prompts: list[list[int]], new_tokens: int
) -> tuple[list[tuple[float, list[int]]], float]:
    """What a user would otherwise do: one PeftModel with every adapter loaded, set_adapter per request,
    greedy decoding with a KV cache (PeftModel.forward for the prompt, then the cache it returns)."""
    from peft import PeftModel

    from app.engine.runner import cache_kwarg_name

    pm = PeftModel.from_pretrained(loaded.model, str(adapters[0][1]), adapter_name=adapters[0][0])
    for name, d, _ in adapters[1:]:
        pm.load_adapter(str(d), adapter_name=name)
    pm.eval()
    kw = cache_kwarg_name(loaded.model)
    dev = loaded.device
    results = []
    t_start = time.perf_counter()
    for (name, _, p), prompt in zip(adapters, prompts, strict=True):
        pm.set_adapter(name)
        ids = torch.tensor([prompt], device=dev)
        s = len(prompt)
        with torch.inference_mode():
            out = pm(
                input_ids=ids, attention_mask=torch.ones(1, s, dtype=torch.long, device=dev), use_cache=True
            )
            cache = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
            # All N requests arrive together: a request's first token waits for every request served before it.
            ttft = time.perf_counter() - t_start
            toks = [tok]
            for t in range(new_tokens - 1):
                pos = torch.tensor([[p + s + t]], device=dev)
                out = loaded.model(
                    input_ids=torch.tensor([[tok]], device=dev),
                    position_ids=pos,
                    attention_mask=torch.ones(1, p + s + t + 1, dtype=torch.long, device=dev),
                    use_cache=True,
                    **{kw: cache},
                )
                cache = out.past_key_values
                tok = int(out.logits[0, -1].argmax())
                toks.append(tok)
        results.append((ttft, toks))
    return results, time.perf_counter() - t_start


def _setup(config: str, args: argparse.Namespace, tmp: Path) -> tuple[Any, list[tuple[str, Path, int]], list[Any]]:
    """The model, the PEFT adapters saved under `tmp`, and (engine_prefixes) the adapters imported as prefixes."""
    from app.engine.model import load_model
    from prefix_store.peft_codec import decode_peft

    loaded = load_model(args.model, data_dir=Path(args.data_dir), device=args.device, dtype=args.dtype)
    adapters = _adapters(loaded, args.n, tmp)
    prefixes: list[Any] = [None] * args.n
    if config == "engine_prefixes":
        prefixes = [
            decode_peft(
                (d / "adapter_config.json").read_bytes(),
                (d / "adapter_model.safetensors").read_bytes(),
                spec=loaded.spec,
                max_virtual_tokens=256,
                max_bytes=2**30,
            )[0]
            for _, d, _ in adapters
        ]
    return loaded, adapters, prefixes


def _child(config: str, args: argparse.Namespace, conn: Any) -> None:
    from app.threads import run_in_own_thread

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        # As the server does (app/threads.py): set-up on a thread that ends, so its OpenMP pool does not
        # outlive it and slow the engine thread.
        loaded, adapters, prefixes = run_in_own_thread(lambda: _setup(config, args, Path(tmp)))
        prompts = _prompts(loaded.tokenizer, args.n)
        if config.startswith("peft_sequential"):
            if config == "peft_sequential_packed":
                from app.engine.packed_linear import pack_linears

                pack_linears(loaded.model)  # before PEFT loads: only the base model's linears
            res, wall = _peft_sequential(loaded, adapters, prompts, args.new_tokens)
        else:
            res, wall = asyncio.run(
                _run_engine(loaded, prompts, prefixes, args.new_tokens, packed=not args.unpacked)
            )
    tokens = sum(len(t) for _, t in res)
    conn.send(_summary(config, [r[0] for r in res], tokens, wall, [t for _, t in res]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"also: {', '.join(EXTRA_CONFIGS)}")
    ap.add_argument("--unpacked", action="store_true", help="engine without oneDNN-packed linears (CPU)")
    ap.add_argument("--out", default="bench/out/engine.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    ctx = mp.get_context("spawn")
    for config in args.configs.split(","):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(config, args, child))
        proc.start()
        rows.append(parent.recv())
        proc.join()
    by = {r["config"]: r for r in rows}
    lines = [
        f"model={args.model} n={args.n} new_tokens={args.new_tokens} device={args.device} "
        f"machine={platform.machine()} cpus={torch.get_num_threads()} torch={torch.__version__}",
        f"{'config':<24}{'tok/s':>10}{'TTFT p50':>11}{'TTFT p99':>11}{'peak MiB':>10}{'wall s':>9}",
    ]
    for r in rows:
        lines.append(
            f"{r['config']:<24}{r['tok_s']:>10.1f}{r['ttft_p50_s']:>10.2f}s{r['ttft_p99_s']:>10.2f}s"
            f"{r['peak_mem_bytes'] / 2**20:>10.0f}{r['wall_s']:>9.1f}"
        )
    ratios: dict[str, float] = {}
    if "engine_prefixes" in by and "peft_sequential" in by:
        ratios["prefixes_vs_peft"] = by["engine_prefixes"]["tok_s"] / by["peft_sequential"]["tok_s"]
        same = sum(
            a == b
            for a, b in zip(by["engine_prefixes"]["outputs"], by["peft_sequential"]["outputs"], strict=True)
        )
        lines.append(f"requests with identical greedy tokens, engine vs PEFT: {same}/{args.n}")
    if "engine_prefixes" in by and "peft_sequential_packed" in by:
        ratios["prefixes_vs_peft_packed"] = by["engine_prefixes"]["tok_s"] / by["peft_sequential_packed"]["tok_s"]
    if "engine_prefixes" in by and "engine_no_prefix" in by:
        ratios["prefixes_vs_no_prefix"] = by["engine_prefixes"]["tok_s"] / by["engine_no_prefix"]["tok_s"]
    lines += [f"{k}: {v:.2f}x" for k, v in ratios.items()]
    log.info("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r.pop("outputs")
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
