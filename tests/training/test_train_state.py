"""A run resumed from a TrainState ends exactly like one never interrupted (the same prefix, bit for bit, on the
CPU): parameters, AdamW moments, the warm-up/decay schedule, the data order, the loss window and the best
validation prefix all carry over, through the checkpoint blob's encoding."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from app.engine.model import LoadedModel
from app.jobs.types import TrainCallbacks, TrainConfig, TrainEvent, TrainingCancelled, TrainResult
from app.training.train_state import decode_checkpoint, encode_checkpoint
from app.training.trainer import train_prefix
from tests.training.helpers import toy_task

# A long warm-up (half the run) and a validation set every 2 steps: a fresh optimizer or schedule, a restarted
# data order or a lost best prefix would each change the result.
CONFIG = TrainConfig(num_virtual_tokens=4, batch_size=4, max_steps=12, warmup_ratio=0.5, eval_every=2,
                     early_stopping_patience=None, checkpoint_every=4)
TRAIN, VAL = toy_task(10), toy_task(3, answer=(450, 451, 452))


def _interrupted_at(loaded: LoadedModel, config: TrainConfig, stop_after: int) -> TrainingCancelled:
    steps: list[int] = []
    callbacks = TrainCallbacks(on_event=lambda e: steps.append(e.step), should_stop=lambda: len(steps) >= stop_after)
    with pytest.raises(TrainingCancelled) as caught:
        train_prefix(loaded, TRAIN, VAL, config, callbacks=callbacks)
    return caught.value


def _same(a: TrainResult, b: TrainResult) -> None:
    assert torch.equal(a.prefix.keys, b.prefix.keys) and torch.equal(a.prefix.values, b.prefix.values)
    assert (a.steps, a.trained_tokens, a.final_train_loss, a.best_val_loss) == (
        b.steps, b.trained_tokens, b.final_train_loss, b.best_val_loss)


@pytest.mark.parametrize("projection", [False, True])
def test_an_interrupted_run_resumed_from_its_state_ends_bit_identical(tiny_llama: LoadedModel,
                                                                      projection: bool) -> None:
    config = TrainConfig(**{**CONFIG.__dict__, "prefix_projection": projection})
    whole = train_prefix(tiny_llama, TRAIN, VAL, config)
    cancelled = _interrupted_at(tiny_llama, config, 5)
    assert cancelled.step == 5 and cancelled.state is not None and cancelled.state.step == 5
    native, state = decode_checkpoint(encode_checkpoint(b"native prefix", cancelled.state))  # as stored
    assert native == b"native prefix" and state is not None
    events: list[TrainEvent] = []
    resumed = train_prefix(tiny_llama, TRAIN, VAL, config, resume=state,
                           callbacks=TrainCallbacks(on_event=events.append))
    assert [e.step for e in events] == list(range(6, 13))
    _same(whole, resumed)


def test_a_periodic_checkpoints_state_resumes_exactly_too(tiny_llama: LoadedModel) -> None:
    """A worker killed after a periodic checkpoint: the next attempt resumes from that checkpoint's state."""
    states: dict[int, Any] = {}
    whole = train_prefix(tiny_llama, TRAIN, VAL, CONFIG, callbacks=TrainCallbacks(
        on_checkpoint=lambda step, _prefix, _metrics, state: states.__setitem__(step, state)))
    assert sorted(states) == [4, 8, 12]
    _same(whole, train_prefix(tiny_llama, TRAIN, VAL, CONFIG, resume=states[8]))
    # resuming at the last step trains nothing more and returns the same result
    _same(whole, train_prefix(tiny_llama, TRAIN, VAL, CONFIG, resume=states[12]))


def test_a_state_of_another_run_is_refused(tiny_llama: LoadedModel) -> None:
    state = _interrupted_at(tiny_llama, CONFIG, 3).state
    with pytest.raises(ValueError, match="another configuration or data"):
        train_prefix(tiny_llama, TRAIN, VAL, TrainConfig(**{**CONFIG.__dict__, "learning_rate": 1e-2}), resume=state)
    with pytest.raises(ValueError, match="another configuration or data"):
        train_prefix(tiny_llama, TRAIN[:-1], VAL, CONFIG, resume=state)


def test_checkpoint_blobs_old_and_new() -> None:
    """A prefix-only blob (the older format: a native prefix) decodes with no state; garbage is refused."""
    assert decode_checkpoint(b"\x10\x00\x00\x00\x00\x00\x00\x00{...}") == (b"\x10\x00\x00\x00\x00\x00\x00\x00{...}",
                                                                          None)
    with pytest.raises(ValueError, match="unreadable"):
        decode_checkpoint(b"PK\x03\x04 not a zip")
