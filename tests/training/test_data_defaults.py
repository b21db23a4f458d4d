"""The data-size defaults (app/jobs/data_defaults.py) and how a request's own values win over them
(app/services/training_setup.py build_config)."""

from __future__ import annotations

from typing import Any

import pytest

from app.jobs.data_defaults import (
    FEW_EXAMPLES_MAX,
    FEW_LEARNING_RATE,
    FEW_NUM_VIRTUAL_TOKENS,
    FEW_STACKED_NUM_VIRTUAL_TOKENS,
    FEW_STACKED_STEPS,
    FEW_STEPS,
    DataDefaults,
    data_defaults,
)
from app.jobs.types import TrainConfig
from app.protocol.fine_tuning import Hyperparameters, TrainingOptions
from app.services.training_setup import TrainingContext, build_config

FULL = TrainConfig()


def test_many_examples_or_an_unknown_count_keep_the_full_size_defaults() -> None:
    full = DataDefaults(batch_size=FULL.batch_size, learning_rate=FULL.learning_rate, max_steps=None,
                        num_virtual_tokens=FULL.num_virtual_tokens)
    assert data_defaults(None) == full
    assert data_defaults(FEW_EXAMPLES_MAX + 1) == full
    assert data_defaults(400) == full
    assert data_defaults(10, "prompt_tuning") == full  # only prefix tuning's few-example regime was measured


@pytest.mark.parametrize("n", [1, 3, 24, FEW_EXAMPLES_MAX])
def test_few_examples_get_a_fixed_number_of_small_batches(n: int) -> None:
    d = data_defaults(n)
    assert d.max_steps == FEW_STEPS and d.learning_rate == FEW_LEARNING_RATE
    assert d.num_virtual_tokens == FEW_NUM_VIRTUAL_TOKENS > FULL.num_virtual_tokens  # room for a whole example
    assert 1 <= d.batch_size <= min(n, 2)
    # More optimizer steps than the full-size rule would give the same examples.
    assert TrainConfig(batch_size=d.batch_size, max_steps=d.max_steps).total_steps(n) > FULL.total_steps(n)


def test_few_examples_on_top_of_a_base_get_a_short_prefix_and_fewer_steps() -> None:
    """Behind a base that already does the task, only the user's own phrasing is left to learn."""
    d, alone = data_defaults(24, on_top=True), data_defaults(24)
    assert (d.max_steps, d.num_virtual_tokens) == (FEW_STACKED_STEPS, FEW_STACKED_NUM_VIRTUAL_TOKENS)
    assert d.max_steps < alone.max_steps and d.num_virtual_tokens < alone.num_virtual_tokens
    assert (d.batch_size, d.learning_rate) == (alone.batch_size, alone.learning_rate)
    assert data_defaults(400, on_top=True) == data_defaults(400)  # many examples: the full-size defaults
    stacked = _config(24, base_p=16)  # build_config passes "on top" from the base's virtual tokens
    assert (stacked.max_steps, stacked.num_virtual_tokens) == (FEW_STACKED_STEPS, FEW_STACKED_NUM_VIRTUAL_TOKENS)


def _ctx(max_virtual_tokens: int = 256) -> TrainingContext:
    # build_config reads only the limits; the stores and tokenizer are not touched.
    return TrainingContext(blobs=None, tokenizer=None, context_length=2048,  # type: ignore[arg-type]
                           base_model_id="m", fingerprint="f", max_virtual_tokens=max_virtual_tokens,
                           max_file_examples=100)


def _config(n: int | None, *, longest: int | None = None, max_p: int = 256, p: int | None = None,
            base_p: int = 0, **hp: Any) -> TrainConfig:
    opts = TrainingOptions(seed=0, num_virtual_tokens=p)
    config, _ = build_config(opts, Hyperparameters(**hp), ctx=_ctx(max_p), warm=None, n_examples=n,
                             longest_example=longest, base_virtual_tokens=base_p)
    return config


def test_the_default_prefix_length_fits_the_server_and_the_longest_example() -> None:
    assert _config(24).num_virtual_tokens == FEW_NUM_VIRTUAL_TOKENS
    assert _config(24, longest=2048 - 40).num_virtual_tokens == 40  # what the longest example leaves
    assert _config(24, longest=2048 - 4).num_virtual_tokens == FULL.num_virtual_tokens  # never below the old default
    assert _config(24, max_p=32).num_virtual_tokens == 32  # the server's limit
    assert _config(24, max_p=8).num_virtual_tokens == 8  # a hard limit: even below the old default
    stack_room = _ctx().stacking.max_virtual_tokens
    assert _config(24, base_p=stack_room - 10).num_virtual_tokens == 10  # what a base leaves of a stack
    assert _config(24, base_p=8).num_virtual_tokens == FEW_STACKED_NUM_VIRTUAL_TOKENS  # on top of a base
    assert _config(24, longest=2040, p=8).num_virtual_tokens == 8  # asked for: as asked
    assert _config(400, longest=100).num_virtual_tokens == FULL.num_virtual_tokens


def test_a_request_without_hyperparameters_gets_the_defaults_for_its_size() -> None:
    few, many = _config(24), _config(400)
    d = data_defaults(24)
    assert (few.batch_size, few.learning_rate, few.max_steps, few.n_epochs) == (
        d.batch_size, d.learning_rate, d.max_steps, None)
    assert (many.batch_size, many.learning_rate, many.max_steps, many.n_epochs) == (
        FULL.batch_size, FULL.learning_rate, None, None)
    assert many.total_steps(400) == FULL.total_steps(400)  # the full-size defaults are unchanged
    assert _config(None) == many


def test_values_the_request_sets_win_over_the_size_defaults() -> None:
    assert _config(24, batch_size=2).batch_size == 2
    assert _config(24, learning_rate=0.01).learning_rate == 0.01
    assert _config(24, learning_rate_multiplier=0.5).learning_rate == FEW_LEARNING_RATE * 0.5
    assert _config(24, max_steps=7).max_steps == 7
    by_epochs = _config(24, n_epochs=2)  # an explicit length in epochs replaces the default length
    assert (by_epochs.max_steps, by_epochs.n_epochs) == (None, 2)
