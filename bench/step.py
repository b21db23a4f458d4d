"""Where a decode step's time goes: forward, token selection and batch book-keeping, timed apart.

Runs the batch verbs directly (no engine thread), then the whole engine on the same requests, and prints both
per-step times, so a gap between them is the loop's own cost. With `--profile`, also prints the top operators
of a few engine steps (torch.profiler). `--weights int4|int8` measures the quantized serving forward
(app/engine/quantized_decoder.py) instead of transformers'.

`--split` splits a decode step (forward, token selection, advance) into matmuls, attention and the rest (framework,
Python, small operators) by taking them out: the step is timed as it is, then with every linear layer's matmul
answering zeros of its output's shape, then with attention doing the same; the differences are their shares.
Medians of `--steps` steps, each phase timed back to back, so a busy machine slows all three alike. With quantized
weights the split runs the decoder layers as Python (they are patched there), and the step with them compiled by
TorchScript, as served, is printed beside it.

    python -m bench.step [--model random:llama-1b] [--n 64] [--steps 32] [--device cuda] [--dtype bfloat16]
    python -m bench.step --model embedded:smollm2-135m-instruct --n 1 --split [--weights int4]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("bench.step")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rows(loaded: Any, n: int, with_prefix: bool) -> list[Any]:
    from app.engine.batch import NewRow
    from app.engine.sampling import SamplerState, SamplingParams
    from prefix_store.types import PrefixKV

    s = loaded.spec
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        prefix = None
        if with_prefix:
            p = 5 + (i * 7) % 16
            shape = (s.num_layers, s.num_kv_heads, p, s.head_dim)
            prefix = PrefixKV(torch.randn(shape, generator=gen) * 0.5, torch.randn(shape, generator=gen) * 0.5)
        prompt = [1 + (i + j) % 200 for j in range(20)]
        params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
        rows.append(NewRow(f"r{i}", prompt, prefix, SamplerState.create(params, loaded.device)))
    return rows


def _direct(loaded: Any, runner: Any, n: int, steps: int, with_prefix: bool) -> dict[str, float]:
    """Per-step milliseconds of each phase, batch verbs driven directly."""
    from app.engine.batch import Batch
    from app.engine.quantized_decoder import KV_DTYPE
    from app.engine.runner import geometry_of
    from app.engine.sampling import select_tokens

    dev = loaded.device
    geometry = geometry_of(loaded.model, dev, KV_DTYPE if runner.serving is not None else loaded.dtype)
    t0 = time.perf_counter()
    batch = Batch.from_requests(_rows(loaded, n, with_prefix), geometry=geometry, pad_token_id=0)
    logits = runner.forward(batch)
    batch.advance([c.token_id for c in select_tokens(logits, [r.sampler for r in batch.rows])])
    _sync(dev)
    prefill = time.perf_counter() - t0
    fwd = sel = adv = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = runner.forward(batch)
        _sync(dev)
        t1 = time.perf_counter()
        choices = select_tokens(logits, [r.sampler for r in batch.rows])
        t2 = time.perf_counter()
        batch.advance([c.token_id for c in choices])
        _sync(dev)
        t3 = time.perf_counter()
        fwd, sel, adv = fwd + t1 - t0, sel + t2 - t1, adv + t3 - t2
    return {
        "prefill_ms": prefill * 1e3,
        "forward_ms": fwd / steps * 1e3,
        "select_ms": sel / steps * 1e3,
        "advance_ms": adv / steps * 1e3,
    }


async def _engine(loaded: Any, n: int, steps: int, with_prefix: bool, packed: bool = True,
                  weights: str = "fp32") -> float:
    """Milliseconds per decode step of the whole engine (thread, intake, events) on the same requests."""
    from app.engine.factory import build_engine
    from app.engine.sampling import SamplingParams
    from app.engine.types import GenerationRequest
    from app.threads import run_in_own_thread

    engine = run_in_own_thread(lambda: build_engine(loaded, packed_linears=packed, weights=weights,
                                                    max_batch_rows=max(64, n)))
    engine.start()
    rows = _rows(loaded, n, with_prefix)
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)

    async def one(r: Any) -> None:
        async for _ in engine.submit(GenerationRequest(r.prompt_ids, params, prefix=r.prefix)):
            pass

    await one(rows[0])  # warm-up
    steps_before = engine.stats.steps
    t0 = time.perf_counter()
    await asyncio.gather(*[one(r) for r in rows])
    wall = time.perf_counter() - t0
    done = engine.stats.steps - steps_before
    engine.stop()
    return wall / max(done, 1) * 1e3


def _cprofile_engine(loaded: Any, n: int, steps: int, weights: str = "fp32") -> None:
    """Run the engine with its thread under cProfile; log the top functions by cumulative time."""
    import cProfile
    import io
    import pstats

    from app.engine import loop

    prof = cProfile.Profile()
    original = loop.Engine._run

    def profiled(self: Any) -> None:
        prof.enable()
        try:
            original(self)
        finally:
            prof.disable()

    loop.Engine._run = profiled  # type: ignore[method-assign]
    try:
        ms = asyncio.run(_engine(loaded, n, steps, True, weights=weights))
    finally:
        loop.Engine._run = original  # type: ignore[method-assign]
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(30)
    log.info("engine thread under cProfile: %.2f ms/step\n%s", ms, out.getvalue())


def _step_ms(loaded: Any, runner: Any, n: int, steps: int) -> float:
    """Median milliseconds of a decode step (forward, token selection, advance) over `steps` steps."""
    from app.engine.batch import Batch
    from app.engine.quantized_decoder import KV_DTYPE
    from app.engine.runner import geometry_of
    from app.engine.sampling import select_tokens

    dtype = KV_DTYPE if runner.serving is not None else loaded.dtype
    batch = Batch.from_requests(_rows(loaded, n, True), geometry=geometry_of(loaded.model, loaded.device, dtype),
                                pad_token_id=0)
    times = []
    for i in range(steps + 3):  # prefill, then two warm-up steps
        t0 = time.perf_counter()
        logits = runner.forward(batch)
        batch.advance([c.token_id for c in select_tokens(logits, [r.sampler for r in batch.rows])])
        _sync(loaded.device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _split(loaded: Any, runner: Any, n: int, steps: int, rounds: int = 2) -> dict[str, float]:
    """A decode step's milliseconds: as it is, in matmuls, in attention, and the rest (module docstring)."""
    from unittest import mock

    from app.engine import quantized_layers
    from app.engine.packed_linear import PackedLinear
    from app.engine.quantized import COMPUTE_DTYPE, QuantizedLinear

    def no_linear(self: Any, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((*x.shape[:-1], self.out_features))

    def no_quantized(self: Any, x: torch.Tensor) -> torch.Tensor:  # its contract: [M, K] -> [M, N] bf16
        return x.new_zeros((x.shape[0], self.out_features), dtype=COMPUTE_DTYPE)

    def no_layer_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: Any,
                        kind: int) -> torch.Tensor:  # quantized_layers.linear, run as Python (scripted=False)
        out = weight.shape[0] if kind != quantized_layers.KIND_INT4 else scales.shape[1]
        return x.new_zeros((x.shape[0], out), dtype=COMPUTE_DTYPE)

    def no_attention(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(q)

    full, no_mm, rest = [], [], []
    for _ in range(rounds):  # phases back to back, twice: a change in the machine's load hits all of them
        full.append(_step_ms(loaded, runner, n, steps))
        with (mock.patch.object(torch.nn.Linear, "forward", no_linear),
              mock.patch.object(PackedLinear, "forward", no_linear),
              mock.patch.object(QuantizedLinear, "__call__", no_quantized),
              mock.patch.object(quantized_layers, "linear", no_layer_linear)):
            no_mm.append(_step_ms(loaded, runner, n, steps))
            with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", no_attention):
                rest.append(_step_ms(loaded, runner, n, steps))
    f, m, r = statistics.median(full), statistics.median(no_mm), statistics.median(rest)
    return {"step_ms": f, "matmul_ms": f - m, "attention_ms": m - r, "rest_ms": r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:tiny-llama")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over a few engine steps")
    ap.add_argument("--cprofile", action="store_true", help="cProfile of the engine thread")
    ap.add_argument("--unpacked", action="store_true", help="CPU: leave the linear layers unpacked")
    ap.add_argument("--weights", default="fp32", choices=["fp32", "int4", "int8"], help="serving weights")
    ap.add_argument("--split", action="store_true", help="only the matmul / attention / rest split of a step")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from app.engine.model import load_model
    from app.engine.quantized_decoder import build_quantized
    from app.engine.runner import ModelRunner
    from app.threads import run_in_own_thread

    # torch work on threads that end, as the server does (app/threads.py): a second OpenMP pool beside the engine
    # thread's makes libgomp stop spin-waiting, which slows every step of a small batch
    loaded = run_in_own_thread(lambda: load_model(args.model, data_dir=Path(args.data_dir), device=args.device,
                                                  dtype=args.dtype))
    torch.set_grad_enabled(False)
    serving = None
    if args.weights != "fp32":
        # --split takes operators out by patching Python functions: the layers must run as Python, not scripted
        serving = run_in_own_thread(lambda: build_quantized(loaded.model, args.weights, loaded.gguf_path,
                                                            scripted=not args.split))
    elif not args.unpacked and loaded.device.type == "cpu":
        from app.engine.packed_linear import pack_linears

        # what the engine does (build_engine), so direct and engine times compare
        run_in_own_thread(lambda: pack_linears(loaded.model))
    runner = ModelRunner(loaded.model, serving)
    lines = [f"model={args.model} n={args.n} steps={args.steps} device={loaded.device} dtype={loaded.dtype} "
             f"weights={args.weights} threads={torch.get_num_threads()} load average {os.getloadavg()[0]:.2f}"]
    if args.split:
        if serving is not None:  # what scripting saves, beside the split of the Python loop
            scripted = ModelRunner(loaded.model, run_in_own_thread(
                lambda: build_quantized(loaded.model, args.weights, loaded.gguf_path)))
            ms = run_in_own_thread(lambda: (_step_ms(loaded, scripted, args.n, args.steps),
                                            _step_ms(loaded, runner, args.n, args.steps)))
            lines.append(f"decode step with the layers scripted {ms[0]:.2f} ms, as Python {ms[1]:.2f} ms "
                         "(the split below runs them as Python)")
        sp = run_in_own_thread(lambda: _split(loaded, runner, args.n, args.steps))
        lines.append(f"decode step {sp['step_ms']:.2f} ms = matmuls {sp['matmul_ms']:.2f} ms "
                     f"({sp['matmul_ms'] / sp['step_ms']:.0%}) + attention {sp['attention_ms']:.2f} ms "
                     f"({sp['attention_ms'] / sp['step_ms']:.0%}) + the rest {sp['rest_ms']:.2f} ms "
                     f"({sp['rest_ms'] / sp['step_ms']:.0%}: framework, Python, small operators, selection)")
        log.info("\n".join(lines))
        return
    for with_prefix in (False, True):
        def direct(wp: bool = with_prefix) -> dict[str, float]:
            _direct(loaded, runner, args.n, 4, wp)  # warm-up
            return _direct(loaded, runner, args.n, args.steps, wp)

        d = run_in_own_thread(direct)
        e = asyncio.run(_engine(loaded, args.n, args.steps, with_prefix, packed=not args.unpacked,
                                weights=args.weights))
        lines.append(
            f"prefixes={with_prefix!s:<5} prefill {d['prefill_ms']:8.1f} ms | decode step: forward "
            f"{d['forward_ms']:7.2f} ms, select {d['select_ms']:6.2f} ms, advance {d['advance_ms']:6.2f} ms"
            f" | whole engine {e:7.2f} ms/step"
        )
    log.info("\n".join(lines))
    if args.cprofile:
        _cprofile_engine(loaded, args.n, args.steps, args.weights)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if loaded.device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            asyncio.run(_engine(loaded, args.n, 8, True))
        key = "self_cuda_time_total" if loaded.device.type == "cuda" else "self_cpu_time_total"
        log.info(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        log.info(prof.key_averages().table(sort_by=key, row_limit=15))


if __name__ == "__main__":
    main()
