"""train_prefix on the tiny random models: learning, determinism, a frozen shared base, warm start, validation,
early stopping, checkpoints, cancellation, events and bad input."""

from __future__ import annotations

import threading

import pytest
import torch

from app.engine.batch import Batch, NewRow
from app.engine.runner import ModelRunner, geometry_of
from app.engine.sampling import SamplerState, SamplingParams
from app.jobs.types import (
    TrainCallbacks,
    TrainConfig,
    TrainEvent,
    TrainingCancelled,
    TrainingDataError,
    TrainingDiverged,
)
from app.training.prefix_params import PrefixParameters
from app.training.trainer import build_optimizer, linear_warmup_decay, train_prefix
from tests.engine.helpers import random_prefix
from tests.training.helpers import evaluate, example, toy_task

# Random starts: the tiny random models and these learning rates were calibrated on them (real-token starts
# are tested in test_init_kv.py).
FAST = TrainConfig(num_virtual_tokens=4, batch_size=4, learning_rate=3e-2, seed=0, prefix_init="random")


def _config(**changes: object) -> TrainConfig:
    return TrainConfig(**{**FAST.__dict__, **changes})


def _events() -> tuple[list[TrainEvent], TrainCallbacks]:
    events: list[TrainEvent] = []
    return events, TrainCallbacks(on_event=events.append)


@pytest.mark.parametrize("projection", [False, True])
def test_loss_decreases_on_a_memorisable_task(tiny, projection) -> None:
    data = toy_task(16)
    events, callbacks = _events()
    # Measured on these models: the direct KV needs a far larger step than the MLP to move in 30 steps.
    config = _config(max_steps=30, num_virtual_tokens=8, prefix_projection=projection,
                     learning_rate=0.1 if projection else 1.0)
    result = train_prefix(tiny, data, None, config, callbacks=callbacks)
    assert result.steps == 30 and result.stop_reason == "completed"
    assert [e.step for e in events] == list(range(1, 31))
    assert result.final_train_loss is not None and result.final_train_loss < events[0].train_loss - 1.0
    # on the whole set with the exported prefix, not only the optimizer's own running mean
    start_loss, start_accuracy = evaluate(tiny, PrefixParameters(tiny.spec, 8, projection=projection).export(), data)
    loss, accuracy = evaluate(tiny, result.prefix, data)
    assert loss < start_loss - 1.0 and start_accuracy < 0.5 and accuracy == 1.0
    assert result.prefix.base_fingerprint == tiny.spec.fingerprint


@pytest.mark.parametrize("projection", [False, True])
def test_same_seed_same_data_gives_a_bit_identical_prefix(tiny_llama, projection) -> None:
    config = _config(max_steps=8, prefix_projection=projection, validation_split=0.25)
    a = train_prefix(tiny_llama, toy_task(12), None, config).prefix
    b = train_prefix(tiny_llama, toy_task(12), None, config).prefix
    c = train_prefix(tiny_llama, toy_task(12), None, _config(**{**config.__dict__, "seed": 1})).prefix
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert not torch.equal(a.keys, c.keys)


def test_the_base_model_stays_frozen_and_untouched(tiny) -> None:
    model = tiny.model
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    train_prefix(tiny, toy_task(8), toy_task(4), _config(max_steps=5, eval_every=2))
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_the_optimizer_holds_only_the_prefix(tiny_llama) -> None:
    prefix = PrefixParameters(tiny_llama.spec, 4, projection=True)
    optimizer, _ = build_optimizer(prefix, FAST, 10)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in prefix.parameters()}
    assert held.isdisjoint(id(p) for p in tiny_llama.model.parameters())


def test_trains_when_the_calling_thread_has_grad_or_inference_mode_off(tiny_llama) -> None:
    config = _config(max_steps=3)
    expected = train_prefix(tiny_llama, toy_task(8), None, config).prefix
    with torch.inference_mode():
        in_inference = train_prefix(tiny_llama, toy_task(8), None, config).prefix
    with torch.no_grad():
        in_no_grad = train_prefix(tiny_llama, toy_task(8), None, config).prefix
    assert torch.equal(in_inference.keys, expected.keys) and torch.equal(in_no_grad.keys, expected.keys)


def test_training_beside_a_serving_thread_changes_neither(tiny_llama) -> None:
    """The same model object serves (inference mode, another thread) while a prefix trains: both stay exact."""
    loaded = tiny_llama
    runner = ModelRunner(loaded.model)
    prefix = random_prefix(loaded, 3, seed=7)

    def serve() -> torch.Tensor:
        row = NewRow("r", [5, 6, 7, 8], prefix, SamplerState.create(SamplingParams(max_tokens=1), loaded.device))
        return runner.forward(Batch.from_requests([row], geometry=geometry_of(loaded.model, loaded.device,
                                                  loaded.dtype), pad_token_id=int(loaded.tokenizer.pad_token_id)))

    reference = serve()
    config = _config(max_steps=25)
    alone = train_prefix(loaded, toy_task(16), None, config).prefix
    result: list = []
    worker = threading.Thread(target=lambda: result.append(train_prefix(loaded, toy_task(16), None, config)))
    worker.start()
    served = 0
    while worker.is_alive() or served == 0:
        torch.testing.assert_close(serve(), reference, rtol=0, atol=1e-6)
        served += 1
    worker.join()
    assert torch.equal(result[0].prefix.keys, alone.keys) and torch.equal(result[0].prefix.values, alone.values)


@pytest.mark.parametrize("projection", [False, True])
def test_warm_start_begins_exactly_at_the_init(tiny_llama, projection) -> None:
    data = toy_task(8)
    init = train_prefix(tiny_llama, data, None, _config(max_steps=20, learning_rate=1.0)).prefix
    events, callbacks = _events()
    # batch_size = the whole set: step 1's loss is the init's loss on the whole set, to float precision
    config = _config(max_steps=1, batch_size=8, prefix_projection=projection)
    train_prefix(tiny_llama, data, None, config, init=init, callbacks=callbacks)
    assert events[0].train_loss == pytest.approx(evaluate(tiny_llama, init, data)[0], rel=1e-6)
    fresh_events, fresh_callbacks = _events()
    train_prefix(tiny_llama, data, None, config, callbacks=fresh_callbacks)
    assert events[0].train_loss < fresh_events[0].train_loss - 1.0


def test_validation_events_and_best_prefix(tiny_llama) -> None:
    events, callbacks = _events()
    result = train_prefix(tiny_llama, toy_task(12), toy_task(4, answer=(300, 121, 301, 9)),
                          _config(max_steps=7, eval_every=3, early_stopping_patience=None), callbacks=callbacks)
    assert [e.step for e in events if e.val_loss is not None] == [3, 6, 7]  # every 3 steps and at the end
    best = min(e.val_loss for e in events if e.val_loss is not None)
    assert result.best_val_loss == best and result.metrics["best_val_loss"] == best
    assert all(e.train_loss is not None and e.learning_rate and e.tokens_per_s > 0 for e in events)
    assert all(e.total_steps == 7 for e in events)


def test_schedule_warms_up_then_decays_linearly(tiny_llama) -> None:
    factor = linear_warmup_decay(10, 2)
    assert [round(factor(s), 4) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    events, callbacks = _events()
    train_prefix(tiny_llama, toy_task(8), None, _config(max_steps=10, warmup_ratio=0.2), callbacks=callbacks)
    assert [e.learning_rate for e in events] == pytest.approx([3e-2 * factor(s) for s in range(10)])


def test_validation_split_holds_examples_out_and_tokens_are_counted(tiny_llama) -> None:
    data = toy_task(12)
    one_epoch = _config(n_epochs=1, batch_size=4)
    result = train_prefix(tiny_llama, data, None, one_epoch)
    assert result.steps == 3 and result.trained_tokens == sum(len(ex.input_ids) for ex in data)
    assert result.best_val_loss is None
    held = train_prefix(tiny_llama, data, None, _config(**{**one_epoch.__dict__, "validation_split": 0.25}))
    assert held.best_val_loss is not None
    assert held.trained_tokens < result.trained_tokens and held.steps == 3  # 9 examples: 3 batches of <= 4


def test_early_stopping_returns_the_best_prefix(tiny_llama) -> None:
    # Validation answers use tokens the training set never shows: learning the task only makes them less likely.
    val = toy_task(4, answer=(450, 451, 452, 453))
    checkpoints: dict[int, object] = {}
    events, callbacks = _events()
    callbacks.on_checkpoint = lambda step, prefix, metrics, _state: checkpoints.__setitem__(step, prefix)
    config = _config(max_steps=200, eval_every=2, checkpoint_every=2, early_stopping_patience=2)
    result = train_prefix(tiny_llama, toy_task(12), val, config, callbacks=callbacks)
    assert result.stop_reason == "early_stopped" and result.steps < 200
    vals = [(e.step, e.val_loss) for e in events if e.val_loss is not None]
    best_step, best = min(vals, key=lambda sv: sv[1])
    # patience (2) ran out: the best eval came before the last two, and training stopped at the last eval
    assert result.steps == vals[-1][0] and best_step <= vals[-3][0]
    assert result.best_val_loss == best and result.metrics["best_step"] == best_step
    assert torch.equal(result.prefix.keys, checkpoints[best_step].keys)


def test_checkpoints(tiny_llama) -> None:
    calls: list = []
    callbacks = TrainCallbacks(on_checkpoint=lambda step, prefix, metrics, _s: calls.append((step, prefix, metrics)))
    result = train_prefix(tiny_llama, toy_task(8), None, _config(max_steps=7, checkpoint_every=3), callbacks=callbacks)
    assert [c[0] for c in calls] == [3, 6]
    assert all(c[1].keys.shape == result.prefix.keys.shape and "train_loss" in c[2] for c in calls)
    assert calls[0][1].metadata["training_step"] == "3"
    assert not torch.equal(calls[0][1].keys, calls[1][1].keys)


def test_cancel_stops_between_steps(tiny_llama) -> None:
    events, callbacks = _events()
    callbacks.should_stop = lambda: len(events) >= 3
    with pytest.raises(TrainingCancelled):
        train_prefix(tiny_llama, toy_task(8), None, _config(max_steps=50), callbacks=callbacks)
    assert [e.step for e in events] == [1, 2, 3]


def test_bad_input_is_refused_with_the_reason(tiny_llama, tiny_gpt2) -> None:
    ok = toy_task(4)
    with pytest.raises(TrainingDataError, match="no training examples"):
        train_prefix(tiny_llama, [], None, FAST)
    with pytest.raises(TrainingDataError, match="training example 2 has no completion"):
        train_prefix(tiny_llama, [ok[0], example([1, 2], [])], None, FAST)
    with pytest.raises(TrainingDataError, match=r"validation example 1 .* context length 1024"):
        train_prefix(tiny_gpt2, ok, [example([5] * 1020, [6, 7])], FAST)
    with pytest.raises(TrainingDataError, match="outside the vocabulary"):
        train_prefix(tiny_llama, [example([1, 2], [512])], None, FAST)
    with pytest.raises(ValueError, match="learning_rate"):
        train_prefix(tiny_llama, ok, None, _config(learning_rate=0.0))
    with pytest.raises(ValueError, match="num_virtual_tokens must equal"):
        train_prefix(tiny_llama, ok, None, FAST, init=random_prefix(tiny_llama, 7, seed=1))


def test_a_diverging_run_fails_clearly(tiny_llama) -> None:
    bad = random_prefix(tiny_llama, 4, seed=1)
    bad.keys[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="step 1"):
        train_prefix(tiny_llama, toy_task(4), None, _config(max_steps=3), init=bad)
