"""Toy data for trainer tests, in raw token ids.

The tiny random models cannot get confident (a final norm and a small random LM head bound every logit to a
couple of units), so their loss floor is high: a task they can memorise has one fixed answer after varied prompts.
Learning it shows as the greedy prediction of every answer token, and ~2 nats less loss (from ~6.2, uniform).
"""

from __future__ import annotations

import torch

from app.engine.model import LoadedModel
from app.jobs.types import TokenizedExample
from app.training.forward import PrefixForward, collate
from prefix_store.types import PrefixKV

ANSWER = (300, 120, 301, 9)


def example(prompt: list[int], completion: list[int]) -> TokenizedExample:
    """Loss on the completion tokens only."""
    return TokenizedExample(prompt + completion, [False] * len(prompt) + [True] * len(completion))


def toy_task(n: int = 16, answer: tuple[int, ...] = ANSWER) -> list[TokenizedExample]:
    """n prompts of 3 to 7 tokens, all completed by `answer`."""
    return [example([40 + k + j for j in range(2 + k % 5)] + [7], list(answer)) for k in range(n)]


def evaluate(loaded: LoadedModel, prefix: PrefixKV, examples: list[TokenizedExample]) -> tuple[float, float]:
    """(mean target loss, greedy accuracy on the targets) of `prefix` on `examples`, via the trainer's forward."""
    batch = collate(examples, num_virtual_tokens=prefix.num_virtual_tokens,
                    pad_token_id=int(loaded.tokenizer.pad_token_id), device=loaded.device)
    with torch.no_grad():
        logits = PrefixForward(loaded.model).target_logits(prefix.keys, prefix.values, batch)
    loss = torch.nn.functional.cross_entropy(logits, batch.labels)
    return float(loss), float((logits.argmax(-1) == batch.labels).float().mean())
