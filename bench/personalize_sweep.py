"""In-process sweep behind the few-example defaults: train a user's prefix with given settings, score it greedily.

Faster to iterate on than bench/personalize.py (no server, one model load for several runs): each run trains with
`train_prefix` on bench/user_styles.py's examples and scores held-out examples by greedy decoding through the
trainer's own forward (left-padded batch, the served position convention), at the steps named by `--at`
(checkpoints of the same run, so a curve costs one run). Exact match here is what the server gives up to float
rounding; the headline number is always bench/personalize.py's, through the API.

    python -m bench.personalize_sweep --runs '[{"max_steps": 120}, {"max_steps": 60, "learning_rate": 5e-2}]'
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.e2e_data import Example, score
from bench.user_styles import generate_user

log = logging.getLogger("bench.personalize_sweep")


def greedy(loaded: Any, prefix: Any, prompts: list[list[int]], max_new: int, stop: int) -> list[list[int]]:
    """Greedy continuations of `prompts` behind `prefix` (a PrefixKV), all rows in one left-padded batch."""
    from app.engine.runner import cache_kwarg_name
    from app.training.forward import prefix_cache

    p, b = prefix.num_virtual_tokens, len(prompts)
    s = max(len(x) for x in prompts)
    pad = int(loaded.tokenizer.pad_token_id)
    ids = torch.full((b, s), pad, dtype=torch.long)
    mask = torch.zeros((b, p + s), dtype=torch.long)
    mask[:, :p] = 1
    pos = torch.zeros((b, s), dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, s - len(x):] = torch.tensor(x)
        mask[i, p + s - len(x):] = 1
        pos[i, s - len(x):] = torch.arange(p, p + len(x))
    cache = prefix_cache(prefix.keys, prefix.values, b, loaded.dtype)
    kw = cache_kwarg_name(loaded.model)  # transformers renamed `past_key_values` during 5.x
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    nxt_pos = pos[:, -1:] + 1
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                              logits_to_keep=1, **{kw: cache}).logits[:, -1]
        for _ in range(max_new):
            tok = logits.argmax(-1)
            for i in range(b):
                if not done[i]:
                    t = int(tok[i])
                    if t == stop or t in loaded.eos_token_ids:
                        done[i] = True
                    else:
                        out[i].append(t)
            if all(done):
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
            logits = loaded.model(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt_pos,
                                  use_cache=True, **{kw: cache}).logits[:, -1]
            nxt_pos = nxt_pos + 1
    return out


def score_prefix(loaded: Any, prefix: Any, test: list[Example]) -> dict[str, Any]:
    """Exact match and BLEU of greedy completions behind `prefix`, and the first wrong answers."""
    tok = loaded.tokenizer
    newline = tok.encode("\n", add_special_tokens=False)[0]
    hyps = [tok.decode(o) for o in greedy(loaded, prefix, [tok.encode(e.prompt) for e in test], 64, newline)]
    sc = score(hyps, [e.completion for e in test])
    return {"exact_match": sc["exact_match"], "bleu": sc["bleu"],
            "wrong": [[e.completion, h] for e, h in zip(test, hyps, strict=True) if h.strip() != e.completion.strip()
                      ][:8]}


def task_prefix(loaded: Any, users: int, cache: Path) -> Any:
    """bench/stacking.py's task prefix (the examples of `users` other users, the full-size defaults), trained
    once and kept in `cache`."""
    from app.jobs.data import tokenize_examples
    from app.jobs.types import TrainConfig
    from app.training.trainer import train_prefix
    from prefix_store.types import PrefixKV

    if cache.exists():
        keys, values = torch.load(cache)
        return PrefixKV(keys, values)
    data = [e for i in range(users) for e in generate_user(f"t{i}", 24, 0)[0]]
    examples = tokenize_examples([e.record() for e in data], loaded.tokenizer, max_tokens=2048)
    prefix = train_prefix(loaded, examples, None, TrainConfig()).prefix
    torch.save((prefix.keys, prefix.values), cache)
    return prefix


def run_one(loaded: Any, train: list[Example], test: list[Example], hp: dict[str, Any], at: list[int],
            base: Any = None) -> dict[str, Any]:
    from app.jobs.data import tokenize_examples
    from app.jobs.data_defaults import data_defaults
    from app.jobs.types import TrainCallbacks, TrainConfig
    from app.training.trainer import train_prefix
    from prefix_store.stack import concat_prefixes

    hp = dict(hp)
    # Experiment: the training set in order of length, so the start is the longest example's tokens (and, since the
    # seeded shuffle starts from that order, the batches come in another order too).
    longest_first = hp.pop("longest_first", False)
    # Experiment: which tokens the prefix starts from, the batch order untouched ("shortest": the shortest examples
    # first; "shuffled": the defaults' tokens in a seeded random order, a start with real activations' scales but
    # no demonstration in it).
    init_tokens = hp.pop("init_tokens", None)
    # Experiment: the training forward and backward under bf16 autocast (CPUs with AVX-512 BF16 or AMX multiply
    # bf16 at about twice fp32's rate; AVX2-only CPUs emulate it).
    autocast = hp.pop("autocast_bf16", False)
    d = data_defaults(len(train))
    fields = {"batch_size": d.batch_size, "learning_rate": d.learning_rate, "max_steps": d.max_steps,
              "num_virtual_tokens": d.num_virtual_tokens, "seed": 0} | hp
    config = TrainConfig(**fields, checkpoint_every=1)
    tok = loaded.tokenizer
    examples = tokenize_examples([e.record() for e in train], tok, max_tokens=2048)
    if longest_first:
        examples.sort(key=lambda ex: -len(ex.input_ids))
    init = None
    if init_tokens is not None:
        from app.training.init_kv import init_token_ids, real_token_kv

        p = config.num_virtual_tokens
        if init_tokens == "shortest":
            ids = init_token_ids(sorted(examples, key=lambda ex: len(ex.input_ids)), p)
        elif init_tokens == "shuffled":
            ids = init_token_ids(examples, p)
            random.Random(0).shuffle(ids)
        else:
            raise ValueError(f"unknown init_tokens {init_tokens!r}")
        init = real_token_kv(loaded, ids, p, base)
    snaps: dict[int, Any] = {}
    steps = sorted({s for s in at if s < config.total_steps(len(train))} | {config.total_steps(len(train))})
    callbacks = TrainCallbacks(on_checkpoint=lambda s, prefix, _m, _st: snaps.__setitem__(s, prefix)
                               if s in steps else None)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        result = train_prefix(loaded, examples, None, config, init=init, callbacks=callbacks, base=base)
    train_s = time.perf_counter() - t0
    curve = {}
    for s in steps:
        curve[s] = score_prefix(loaded, snaps[s] if base is None else concat_prefixes([base, snaps[s]]), test)
        log.info("  step %d: exact %.1f%%", s, curve[s]["exact_match"])
    for ref, hyp in curve[steps[-1]]["wrong"]:
        log.info("    wrong: %r for %r", hyp, ref)
    return {"hp": fields, "train_s": train_s, "s_per_step": train_s / result.steps,
            "final_loss": result.final_train_loss, "curve": curve, "prefixes": snaps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="[{}]", help="JSON list of hyperparameter overrides, one run each")
    ap.add_argument("--user", default="ann")
    ap.add_argument("--train", type=int, default=24)
    ap.add_argument("--test", type=int, default=50)
    ap.add_argument("--at", default="", help="comma-separated steps to score besides the last")
    ap.add_argument("--task-users", type=int, default=0,
                    help="train on top of bench/stacking.py's task prefix from this many other users (0: no base)")
    ap.add_argument("--task-cache", default="bench/out/task_prefix.pt", help="where that task prefix is kept")
    ap.add_argument("--data-dir", help="where the converted model is cached between runs (default: a new temp dir)")
    ap.add_argument("--soup", action="store_true",
                    help="also score the runs' prefixes averaged (a weight-space average at each common step)")
    ap.add_argument("--out", default="bench/out/personalize_sweep.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from app.engine.model import load_model
    from prefix_store.stack import concat_prefixes

    data_dir = Path(args.data_dir or tempfile.mkdtemp())
    loaded = load_model("embedded:smollm2-135m-instruct", data_dir=data_dir)
    train, test = generate_user(args.user, args.train, args.test)
    at = [int(x) for x in args.at.split(",") if x]
    base, results = None, []
    if args.task_users:
        base = task_prefix(loaded, args.task_users, Path(args.task_cache))
        results.append({"task_alone": score_prefix(loaded, base, test)})
        log.info("task prefix alone: exact %.1f%%", results[-1]["task_alone"]["exact_match"])
    for hp in json.loads(args.runs):
        log.info("run %s", hp)
        results.append(run_one(loaded, train, test, hp, at, base))
        log.info("  -> %.2f s/step, loss %s", results[-1]["s_per_step"], results[-1]["final_loss"])
    if args.soup:
        from prefix_store.types import PrefixKV

        runs = [r for r in results if "prefixes" in r]
        common = sorted(set.intersection(*(set(r["prefixes"]) for r in runs)))
        soup = {}
        for s in common:
            parts = [r["prefixes"][s] for r in runs]
            avg = PrefixKV(torch.stack([x.keys for x in parts]).mean(0), torch.stack([x.values for x in parts]).mean(0))
            soup[s] = score_prefix(loaded, avg if base is None else concat_prefixes([base, avg]), test)
            log.info("soup of %d runs at step %d: exact %.1f%%", len(parts), s, soup[s]["exact_match"])
        results.append({"soup": soup})
    for r in results:
        r.pop("prefixes", None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.processor(), "user": args.user,
                                          "results": results}, indent=2))


if __name__ == "__main__":
    main()
