"""Up-front checks of a training run's hyperparameters and examples, so a bad job fails before its first step
with a message naming what is wrong (the API validates hyperparameters earlier; these guard every caller)."""

from __future__ import annotations

from collections.abc import Sequence

from app.engine.factory import context_length
from app.engine.model import LoadedModel
from app.jobs.types import TokenizedExample, TrainConfig, TrainingDataError


def check_config(config: TrainConfig, total_steps: int) -> None:
    """Refuse hyperparameters that cannot train (the API validates them earlier; this guards direct callers)."""
    problems = [
        (config.num_virtual_tokens < 1, "num_virtual_tokens must be at least 1"),
        (config.batch_size < 1, "batch_size must be at least 1"),
        (not config.learning_rate > 0, "learning_rate must be positive"),
        (total_steps < 1, "the run must have at least one step (n_epochs / max_steps)"),
        (config.eval_every < 1, "eval_every must be at least 1"),
        (config.checkpoint_every is not None and config.checkpoint_every < 1, "checkpoint_every must be >= 1"),
        (config.early_stopping_patience is not None and config.early_stopping_patience < 1, "patience must be >= 1"),
        (not 0.0 <= config.warmup_ratio <= 1.0, "warmup_ratio must be in [0, 1]"),
        (config.weight_decay < 0, "weight_decay must not be negative"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(message)


def check_examples(examples: Sequence[TokenizedExample], loaded: LoadedModel, p: int, what: str) -> None:
    """Every example fits the model (context length with the prefix, vocabulary) and has a target to learn."""
    max_pos = context_length(loaded)
    vocab = int(loaded.model.config.vocab_size)
    for i, ex in enumerate(examples, start=1):
        n = len(ex.input_ids)
        if p + n > max_pos:
            raise TrainingDataError(
                f"{what} example {i} has {n} tokens; with the {p}-token prefix that exceeds the model's "
                f"context length {max_pos}"
            )
        if not any(ex.loss_mask[1:]):
            raise TrainingDataError(f"{what} example {i} has no completion tokens to train on")
        if n and (min(ex.input_ids) < 0 or max(ex.input_ids) >= vocab):
            raise TrainingDataError(f"{what} example {i} has token ids outside the vocabulary (size {vocab})")
