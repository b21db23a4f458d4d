"""The HF PEFT side of bench/quality.py: prefix-tuning with peft on the same data, steps and seed.

The loop is what a PEFT user writes: `get_peft_model(PrefixTuningConfig)`, labels -100 on the prompt, AdamW with
the same linear warm-up/decay, the same batch size, steps and seed; then greedy decoding through
`PeftModel.forward` with its KV cache (PeftModel.generate on transformers 5.x drops the prefix).
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from bench.e2e_data import Example, score

log = logging.getLogger("bench.quality")


def _encode(tok: Any, ex: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels): the prompt as the server encodes it, then the completion and EOS."""
    prompt = list(tok.encode(ex.prompt))
    completion = [*tok.encode(ex.completion, add_special_tokens=False), tok.eos_token_id]
    return prompt + completion, [-100] * len(prompt) + completion


def _batch(tok: Any, items: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in items)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(items), width), pad)
    labels = torch.full((len(items), width), -100)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (x, y) in enumerate(items):  # right padding, as PEFT's examples do
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _train(pm: Any, tok: Any, train: list[Example], args: argparse.Namespace) -> list[float]:
    data = [_encode(tok, e) for e in train]
    rng = random.Random(args.seed)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, int(0.1 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / max(1, args.steps - warmup)))
    )
    order: list[int] = []
    step_times = []
    for step in range(args.steps):
        if len(order) < args.batch_size:
            order += rng.sample(range(len(data)), len(data))
        idx, order = order[: args.batch_size], order[args.batch_size :]
        t0 = time.perf_counter()
        loss = pm(**_batch(tok, [data[i] for i in idx])).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        if step % 25 == 0 or step == args.steps - 1:
            log.info("peft step %d/%d loss %.4f (%.2f s/step)", step + 1, args.steps, float(loss), step_times[-1])
    return step_times


@torch.inference_mode()
def _greedy(pm: Any, model: Any, tok: Any, prompt: list[int], p: int, max_new: int) -> str:
    from app.engine.runner import cache_kwarg_name

    kw = cache_kwarg_name(model)
    s = len(prompt)
    out = pm(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, s, dtype=torch.long), use_cache=True)
    cache, tok_id, toks = out.past_key_values, int(out.logits[0, -1].argmax()), []
    for t in range(max_new):
        if tok_id == tok.eos_token_id:
            break
        toks.append(tok_id)
        if "\n" in tok.decode(toks):
            break
        out = model(
            input_ids=torch.tensor([[tok_id]]),
            position_ids=torch.tensor([[p + s + t]]),
            attention_mask=torch.ones(1, p + s + t + 1, dtype=torch.long),
            use_cache=True,
            **{kw: cache},
        )
        cache, tok_id = out.past_key_values, int(out.logits[0, -1].argmax())
    return str(tok.decode(toks)).split("\n")[0]


def run_peft(train: list[Example], test: list[Example], args: argparse.Namespace) -> dict[str, Any]:
    """Train with PEFT, decode the held-out set greedily, score it."""
    from peft import PrefixTuningConfig, get_peft_model

    from app.engine.model import load_model

    loaded = load_model("embedded:smollm2-135m-instruct", data_dir=Path("data"))
    torch.manual_seed(args.seed)
    cfg = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=args.num_virtual_tokens, prefix_projection=args.prefix_projection
    )
    pm = get_peft_model(loaded.model, cfg)
    tok = loaded.tokenizer
    t0 = time.perf_counter()
    step_times = _train(pm, tok, train, args)
    wall = time.perf_counter() - t0
    pm.eval()
    hyps = [_greedy(pm, loaded.model, tok, list(tok.encode(e.prompt)), args.num_virtual_tokens, 64) for e in test]
    step_times.sort()
    return score(hyps, [e.completion for e in test]) | {
        "train_wall_s": wall,
        "step_s": sum(step_times) / len(step_times),
        "step_s_median": step_times[len(step_times) // 2],
    }
