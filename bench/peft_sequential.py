"""HF PEFT one request at a time: the baseline bench/engine.py's PEFT configurations measure.

Real PEFT prefix-tuning adapters (random prompt embeddings, saved with `save_pretrained`), and the loop a user
would otherwise write: one PeftModel with every adapter loaded, `set_adapter` per request, greedy decoding with a
KV cache.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def make_adapters(loaded: Any, n: int, workdir: Path) -> list[tuple[str, Path, int]]:
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


def peft_sequential(
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
