"""llama.cpp's `llama-batched-bench` on the same GGUF file, for bench/engine.py's side-by-side table.

Found through `--llama-cpp DIR` or the LLAMA_CPP_DIR environment variable: a llama.cpp build tree (the binary in
`build/bin/`, `bin/` or the directory itself). How to build it: bench/RESULTS.md, "llama.cpp side by side".

`llama-batched-bench -npp P -ntg G -npl 1,8,32` runs, for each row count B, B sequences of P prompt tokens, then G
generation steps of B tokens each, and reports the prompt time (t_pp), the generation time (t_tg) and the total
(t). The engine's tok/s counts generated tokens over the wall time from submission to the last token, prefill
included, so the comparable llama.cpp figure is B * G / t (`tok_s` here); `decode_tok_s` is llama.cpp's own
generation-only rate (B * G / t_tg).

A llama.cpp built with GGML_NATIVE on a CPU that reports AMX but runs in a VM whose kernel does not let a process
use the tile registers dies on its first AMX instruction (SIGILL or SIGSEGV at `ldtilecfg`); the run is then
repeated with `--no-repack`, which keeps the weights out of the AMX buffer type, and the result says so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

BINARY = "llama-batched-bench"
_CRASHES = {-signal.SIGILL, -signal.SIGSEGV, 128 + signal.SIGILL, 128 + signal.SIGSEGV}


def find_binary(directory: str | None) -> Path | None:
    """The llama-batched-bench under `directory` (or $LLAMA_CPP_DIR); None when neither names one."""
    root = directory or os.environ.get("LLAMA_CPP_DIR")
    if not root:
        return None
    for candidate in (Path(root) / "build" / "bin" / BINARY, Path(root) / "bin" / BINARY, Path(root) / BINARY):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"no executable {BINARY} under {root} (looked in build/bin, bin and the directory)")


def gguf_file(model: str) -> Path | None:
    """The GGUF file a model source names (the embedded model's, or a .gguf path); None for other sources."""
    from app.engine.gguf_cache import embedded_gguf_path
    from app.engine.sources import EMBEDDED_MODEL

    if model == EMBEDDED_MODEL:
        return embedded_gguf_path()
    if model.lower().endswith(".gguf"):
        return Path(model).expanduser().resolve()
    return None


def _command(binary: Path, gguf: Path, rows: list[int], prompt_tokens: int, new_tokens: int, threads: int,
             no_repack: bool) -> list[str]:
    ctx = max(4096, max(rows) * (prompt_tokens + new_tokens) + 256)
    cmd = [str(binary), "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(prompt_tokens),
           "-ntg", str(new_tokens), "-npl", ",".join(map(str, rows)), "-t", str(threads), "--output-format", "jsonl"]
    return [*cmd, "--no-repack"] if no_repack else cmd


def run(binary: Path, gguf: Path, rows: list[int], *, prompt_tokens: int, new_tokens: int, threads: int,
        timeout_s: float = 600) -> dict[str, Any]:
    """{"rows": {B: {tok_s, decode_tok_s, itl_p50_ms, ttft_p50_s, wall_s}}, "command": [...], "no_repack": bool}."""
    no_repack = False
    proc = subprocess.run(_command(binary, gguf, rows, prompt_tokens, new_tokens, threads, no_repack),
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode in _CRASHES:  # AMX not usable in this VM (module docstring)
        no_repack = True
        proc = subprocess.run(_command(binary, gguf, rows, prompt_tokens, new_tokens, threads, no_repack),
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{BINARY} exited with {proc.returncode}: {proc.stderr[-2000:]}")
    out: dict[int, dict[str, float]] = {}
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        b, g = int(r["pl"]), int(r["tg"])
        # TTFT: every sequence's first token comes after the whole prompt batch; ITL: one generation step
        out[b] = {"tok_s": b * g / r["t"], "decode_tok_s": b * g / r["t_tg"], "itl_p50_ms": r["t_tg"] / g * 1e3,
                  "ttft_p50_s": r["t_pp"], "wall_s": r["t"]}
    missing = set(rows) - set(out)
    if missing:
        raise RuntimeError(f"{BINARY} reported no result for rows {sorted(missing)}: {proc.stdout[-2000:]}")
    return {"rows": out, "command": _command(binary, gguf, rows, prompt_tokens, new_tokens, threads, no_repack),
            "no_repack": no_repack}
