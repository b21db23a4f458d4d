"""Defaults that depend on how many examples there are: a few examples are trained differently from many.

A request that leaves the batch size, learning rate, length of training or prefix length unset gets the values
here for its number of training examples; anything the request sets wins. The rule is applied once, when the job
is created, and the job stores the values it chose (so the job object shows them and a rerun is identical).

Why two regimes (measured on the embedded SmolLM2-135M, bench/RESULTS.md "Personalization from a few examples"):
the full-size defaults (TrainConfig: batch 8, 3 epochs) give 24 examples 9 optimizer steps, and a prefix after 9
steps has learnt nothing (0% held-out exact match on bench/personalize.py). With few examples the work is not
bounded by the data but by the time a user waits, so the few-example regime trains a fixed number of small
batches: more optimizer updates for the same tokens, about a minute on a 2-core CPU. From FEW_EXAMPLES_MAX + 1
examples on, the full-size defaults apply unchanged (bench/quality.py's 400 examples: 97% exact match).

Torch-free: the API layer applies it while validating a request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from app.jobs.types import TrainConfig, TrainKind

FEW_EXAMPLES_MAX: Final = 64  # at most this many training examples: the few-example regime
FEW_BATCH_SIZE: Final = 2
FEW_STEPS: Final = 120  # 240 example passes: 10 epochs of 24 examples, ~4 of 64; about a minute on 2 cores
FEW_LEARNING_RATE: Final = 3e-2
# Room for one whole example (bench/user_styles.py's are 60-90 tokens), so a new prefix starts as a demonstration
# of the task (app/training/init_kv.py init_token_ids): 75% held-out exact match after 80 steps where 16 virtual
# tokens (the first example's first 16 tokens) had 37.5%.
FEW_NUM_VIRTUAL_TOKENS: Final = 64
# On top of a base prefix (`on_top_of`), which already does the task, a user's few examples only have to add their
# own phrasing: a short prefix trains faster and better there (bench/RESULTS.md "Two-level personalization": 16
# tokens for 80 steps reached 83% held-out exact match, servable 64 s after the call, where 64 tokens for 120
# steps reached 70% in 99 s; one user, one seed).
FEW_STACKED_STEPS: Final = 80
FEW_STACKED_NUM_VIRTUAL_TOKENS: Final = 16


@dataclass(frozen=True)
class DataDefaults:
    """What an unset hyperparameter becomes. max_steps None: TrainConfig's epochs rule decides the length."""

    batch_size: int
    learning_rate: float
    max_steps: int | None
    num_virtual_tokens: int


def data_defaults(n_examples: int | None, kind: TrainKind = "prefix_tuning", *, on_top: bool = False
                  ) -> DataDefaults:
    """The defaults for `n_examples` training examples (None: not known, the full-size defaults); `on_top`: the
    prefix is trained behind a frozen base (`on_top_of`).

    Only prefix tuning has a few-example regime: it is what was measured (a soft prompt keeps TrainConfig's).
    """
    base = TrainConfig()
    if n_examples is None or n_examples > FEW_EXAMPLES_MAX or kind != "prefix_tuning":
        return DataDefaults(batch_size=base.batch_size, learning_rate=base.learning_rate, max_steps=None,
                            num_virtual_tokens=base.num_virtual_tokens)
    return DataDefaults(batch_size=min(FEW_BATCH_SIZE, max(1, n_examples)), learning_rate=FEW_LEARNING_RATE,
                        max_steps=FEW_STACKED_STEPS if on_top else FEW_STEPS,
                        num_virtual_tokens=FEW_STACKED_NUM_VIRTUAL_TOKENS if on_top else FEW_NUM_VIRTUAL_TOKENS)
