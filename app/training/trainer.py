"""Prefix-tuning on the frozen base model (docs/training.md).

`train_prefix` learns a prefix maximizing log p(completion | prefix, prompt) with the base model frozen:
  - only the prefix is optimized: the optimizer holds the prefix parameters alone, and gradients are taken with
    `backward(inputs=...)`, so no base weight ever gets a `.grad`, whatever its requires_grad flag;
  - the model object is shared with the serving engine's thread: it is never put in train mode or modified, and
    grad mode is switched on here, thread-locally (the engine thread runs under inference_mode);
  - same seed + same data -> bit-identical prefix (private generators for init and data order), also across an
    interruption: a run resumed from a checkpoint's TrainState (app/training/train_state.py) continues exactly;
  - on top of a frozen `base` (a prefix or a stack, [L, H_kv, Pb, D]) the prefix is trained with the base in
    front of it, at the positions the stack `base+new` is served at (app/training/forward.py `behind`);
  - `config.kind` "prompt_tuning" trains a soft prompt (learned input embeddings [P, hidden]) instead of a KV
    prefix, through the same loop (app/training/soft_prompt.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from app.engine.model import LoadedModel
from app.jobs.types import (
    StopReason,
    TokenizedExample,
    TrainCallbacks,
    TrainConfig,
    TrainEvent,
    TrainingCancelled,
    TrainingDataError,
    TrainingDiverged,
    TrainResult,
)
from app.training.batches import batch_stream, eval_batches, split_validation
from app.training.checks import check_config, check_examples
from app.training.forward import TrainBatch, collate
from app.training.init_kv import init_token_ids, real_token_kv
from app.training.soft_prompt import token_embeddings, training_method
from app.training.train_state import Progress, TrainState, restore, run_key, snapshot
from prefix_store.types import PrefixKV, PrefixTensors, SoftPrompt

logger = logging.getLogger(__name__)


def linear_warmup_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor for optimizer step s (0-based): (s+1)/w during warm-up, then linear decay to 1/(total-w).

    Unlike transformers' get_linear_schedule_with_warmup, the first step does not run at lr 0 and the last
    not at lr 0 either: on a 150-step CPU budget both would be wasted steps.
    """

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        return max(0.0, (total_steps - s) / max(1, total_steps - warmup_steps))

    return factor


def build_optimizer(
    prefix: torch.nn.Module, config: TrainConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the prefix's parameters only (no state is ever allocated for a base weight), and its schedule."""
    optimizer = torch.optim.AdamW(prefix.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = math.ceil(config.warmup_ratio * total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(total_steps, warmup))


class _Run:
    """One training run's state: the prefix, optimizer, schedule, data and callbacks."""

    def __init__(
        self,
        loaded: LoadedModel,
        train: list[TokenizedExample],
        val: list[TokenizedExample],
        config: TrainConfig,
        init: PrefixTensors | None,
        callbacks: TrainCallbacks,
        key: str,
        resume: TrainState | None,
        base: PrefixKV | None = None,
    ) -> None:
        self.loaded, self.config, self.callbacks, self.key = loaded, config, callbacks, key
        self.base = base
        # The batch's virtual tokens: the frozen base's and the trained prefix's (positions start after both).
        self.virtual_tokens = config.num_virtual_tokens + (base.num_virtual_tokens if base is not None else 0)
        self.total = config.total_steps(len(train))
        # The KV prefix (behind `base`) or the soft prompt, and the loss of a batch through it.
        self.prefix, self.loss_sum = training_method(loaded, config, init, base)
        self.params = list(self.prefix.parameters())
        self.optimizer, self.scheduler = build_optimizer(self.prefix, config, self.total)
        self.batches: Iterator[list[TokenizedExample]] = batch_stream(train, config.batch_size, config.seed)
        self.val = [self._collate(b) for b in eval_batches(val, config.batch_size)]
        self.progress = Progress()
        self.start = 0
        if resume is not None:
            if resume.key != key:
                raise ValueError("the checkpoint's training state belongs to another configuration or data")
            restore(resume, module=self.prefix, optimizer=self.optimizer, scheduler=self.scheduler,
                    progress=self.progress, batches=self.batches)
            self.start = resume.step

    def _collate(self, examples: Sequence[TokenizedExample]) -> TrainBatch:
        return collate(
            examples,
            num_virtual_tokens=self.virtual_tokens,
            pad_token_id=int(self.loaded.tokenizer.pad_token_id),
            device=self.loaded.device,
        )

    def run(self) -> TrainResult:
        stop_reason: StopReason = "completed"
        step = self.start
        while step < self.total:
            if self.callbacks.should_stop():
                fresh = step > self.start  # else the checkpoint this run resumed from already holds this state
                raise TrainingCancelled(f"training cancelled after {step} of {self.total} steps", step=step,
                                        prefix=self._export(step) if fresh else None,
                                        state=self._state(step) if fresh else None)
            step += 1
            lr, tokens_per_s = self._train_step(step)
            due = step % self.config.eval_every == 0 or step == self.total
            val_loss = self._evaluate() if self.val and due else None
            self.callbacks.on_event(TrainEvent(step, self.total, self.progress.train_loss, val_loss, lr, tokens_per_s))
            # The evaluation is recorded before the checkpoint, so its state includes this step's best prefix.
            stop = val_loss is not None and self._record_eval(step, val_loss)
            every = self.config.checkpoint_every
            if every is not None and step % every == 0:
                self.callbacks.on_checkpoint(step, self._export(step), self._metrics(val_loss), self._state(step))
            if stop:
                stop_reason = "early_stopped"
                break
        return self._result(step, stop_reason)

    def _state(self, step: int) -> TrainState:
        return snapshot(key=self.key, step=step, module=self.prefix, optimizer=self.optimizer,
                        scheduler=self.scheduler, progress=self.progress)

    def _train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step; returns (the learning rate it used, real tokens per second)."""
        started = time.perf_counter()
        batch = self._collate(next(self.batches))
        loss = self.loss_sum(batch) / max(1, batch.num_targets)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the training loss is {loss.item()} at step {step}; lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss, inputs=self.params)  # grads for the prefix only, never a base weight
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        seconds = time.perf_counter() - started
        value = float(loss.item())
        p = self.progress
        p.losses.append(value)
        p.trained_tokens += batch.real_tokens
        p.target_tokens += batch.num_targets
        p.seconds += seconds
        return lr, batch.real_tokens / seconds if seconds > 0 else 0.0

    @torch.no_grad()
    def _evaluate(self) -> float:
        """Mean target loss over the whole validation set."""
        total, count = 0.0, 0
        for batch in self.val:
            if self.callbacks.should_stop():
                raise TrainingCancelled("training cancelled during validation")
            total += float(self.loss_sum(batch).item())
            count += batch.num_targets
        self.progress.last_val = total / max(1, count)
        return self.progress.last_val

    def _record_eval(self, step: int, val_loss: float) -> bool:
        """Keep the best prefix so far; True when early stopping's patience has run out."""
        p = self.progress
        if p.best_val is None or val_loss < p.best_val:
            p.best_val, p.best_step, p.bad_evals = val_loss, step, 0
            p.best_prefix = self._export(step)
            return False
        p.bad_evals += 1
        patience = self.config.early_stopping_patience
        return patience is not None and p.bad_evals >= patience

    def _export(self, step: int) -> PrefixTensors:
        export: Callable[[dict[str, str]], PrefixTensors] = self.prefix.export  # type: ignore[assignment]
        return export(
            {"training_step": str(step), "prefix_projection": str(self.config.prefix_projection).lower()}
        )

    def _metrics(self, val_loss: float | None) -> dict[str, float]:
        p = self.progress
        metrics = {"trained_tokens": float(p.trained_tokens), "target_tokens": float(p.target_tokens)}
        if p.train_loss is not None:
            metrics["train_loss"] = p.train_loss
        if val_loss is not None:
            metrics["val_loss"] = val_loss
        return metrics

    def _result(self, step: int, stop_reason: StopReason) -> TrainResult:
        p = self.progress
        prefix = p.best_prefix if p.best_prefix is not None else self._export(step)
        metrics = self._metrics(p.last_val)
        metrics.update(seconds=p.seconds, tokens_per_s=p.trained_tokens / p.seconds if p.seconds else 0.0)
        if p.best_val is not None:
            metrics.update(best_val_loss=p.best_val, best_step=float(p.best_step))
        logger.info(
            "trained a %d-token prefix: %d/%d steps (%s), train loss %s, best val loss %s, %.1f s",
            self.config.num_virtual_tokens,
            step,
            self.total,
            stop_reason,
            p.train_loss,
            p.best_val,
            p.seconds,
        )
        return TrainResult(
            prefix=prefix,
            steps=step,
            trained_tokens=p.trained_tokens,
            final_train_loss=p.train_loss,
            best_val_loss=p.best_val,
            stop_reason=stop_reason,
            metrics=metrics,
        )


def train_prefix(
    loaded: LoadedModel,
    train: Sequence[TokenizedExample],
    val: Sequence[TokenizedExample] | None,
    config: TrainConfig,
    *,
    init: PrefixTensors | None = None,
    callbacks: TrainCallbacks | None = None,
    resume: TrainState | None = None,
    base: PrefixKV | None = None,
) -> TrainResult:
    """Train a prefix for `loaded`'s frozen model on `train`; returns the exported PrefixKV [L, H_kv, P, D] and facts.
    With `base` (keys/values [L, H_kv, Pb, D] on the model's device), the prefix is trained behind it, frozen:
    served as the stack base+prefix, it gives the logits trained here.

    With a validation set (`val`, or `config.validation_split` of `train` held out with the seed), it is evaluated
    every `eval_every` steps and at the end; the best prefix is returned and early stopping may end the run.
    Without one, the final prefix is returned. `resume` (a state the checkpoint callback got from a run with the
    same arguments, `init` included) continues that run exactly from its step. Raises TrainingCancelled
    (callbacks.should_stop), TrainingDataError (unusable examples), TrainingDiverged (non-finite loss), ValueError
    (bad config, warm-start prefix, or a `resume` state of another run).
    """
    train_set, val_set = list(train), list(val or [])
    key = run_key(config, train_set, val_set)
    if not val_set and config.validation_split > 0:
        train_set, val_set = split_validation(train_set, config.validation_split, config.seed)
    if not train_set:
        raise TrainingDataError("there are no training examples")
    check_config(config, config.total_steps(len(train_set)))
    virtual = config.num_virtual_tokens + (base.num_virtual_tokens if base is not None else 0)
    check_examples(train_set, loaded, virtual, "training")
    check_examples(val_set, loaded, virtual, "validation")
    logger.info(
        "training a %d-token prefix (%s) on %d examples (%d validation) for %d steps",
        config.num_virtual_tokens,
        "projection" if config.prefix_projection else "direct",
        len(train_set),
        len(val_set),
        config.total_steps(len(train_set)),
    )
    # The calling thread may be in no-grad or inference mode (the engine thread is); both are thread-local. The
    # prefix is created inside too: a parameter made in inference mode could never take part in autograd.
    if init is None and config.prefix_init == "real_tokens" and config.kind == "prompt_tuning":
        init = SoftPrompt(token_embeddings(loaded, train_set[0].input_ids, config.num_virtual_tokens))
    elif init is None and config.prefix_init == "real_tokens":
        init = real_token_kv(loaded, init_token_ids(train_set, config.num_virtual_tokens), config.num_virtual_tokens,
                             base)
    with torch.inference_mode(False), torch.enable_grad():
        return _Run(loaded, train_set, val_set, config, init, callbacks or TrainCallbacks(), key, resume, base).run()
