"""The trainer's vocabulary, shared by the trainer, the job runner, the API services and the CLI.

Torch-free on purpose: the HTTP layer validates hyperparameters and training files with these types without
importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

StopReason = Literal["completed", "early_stopped", "cancelled"]
PrefixInit = Literal["real_tokens", "random"]
# What a job trains: a KV prefix (per-layer keys/values) or a soft prompt (learned input embeddings).
TrainKind = Literal["prefix_tuning", "prompt_tuning"]


class TrainingDataError(ValueError):
    """A training file or example is unusable; `line` is 1-based (None when not about one line)."""

    def __init__(self, message: str, *, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line
        self.reason = message


class TrainingCancelled(Exception):
    """Raised inside the trainer when `should_stop` says so; the job runner turns it into `cancelled` (or, on a
    worker's shutdown, into a checkpoint of `prefix` and `state` after `step` steps and a re-queue)."""

    def __init__(self, message: str, *, step: int = 0, prefix: Any = None, state: Any = None) -> None:
        super().__init__(message)
        self.step = step
        self.prefix = prefix  # a prefix_store PrefixKV: the prefix after `step` steps (None before the first)
        self.state = state  # an app.training.train_state.TrainState to resume from (None with `prefix`)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/Inf (usually a learning rate too high); nothing is published."""


@dataclass(frozen=True)
class TokenizedExample:
    """One training example as token ids.

    input_ids: the whole sequence (prompt + completion, or the rendered chat), no padding;
    loss_mask: same length; True where the token is a training target (completion / assistant tokens).
    """

    input_ids: list[int]
    loss_mask: list[bool]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and loss_mask ({len(self.loss_mask)}) differ")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters and prefix options. Defaults are chosen by measurement on the embedded model
    (docs/training.md, bench/RESULTS.md), not copied from the paper's GPU-scale settings."""

    num_virtual_tokens: int = 16
    prefix_projection: bool = False  # Li & Liang MLP reparameterization; False trains the KV directly
    encoder_hidden_size: int | None = None  # MLP width when prefix_projection (default: token_dim, as PEFT)
    learning_rate: float = 3e-2
    batch_size: int = 8
    n_epochs: int | None = None  # exactly one of n_epochs / max_steps decides the length (max_steps wins)
    max_steps: int | None = None
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 25  # steps between validation passes (when there is a validation set)
    early_stopping_patience: int | None = 3  # evals without improvement before stopping; None: never
    checkpoint_every: int | None = None  # steps between checkpoints; None: only the final prefix
    validation_split: float = 0.0  # held out of the training set when no validation set is given
    # A new prefix (no warm start) starts from the model's KV of the first training example's tokens
    # ("real_tokens", app/training/init_kv.py: 22% -> 97% exact match on bench/quality.py) or from N(0, 1).
    prefix_init: PrefixInit = "real_tokens"
    # prefix_tuning: a KV prefix; prompt_tuning: a soft prompt [P, hidden] (its "real_tokens" init is the first
    # example's token embeddings, "random" the embeddings of P sampled vocabulary tokens).
    kind: TrainKind = "prefix_tuning"

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps for `n_train` examples."""
        if self.max_steps is not None:
            return self.max_steps
        per_epoch = max(1, -(-n_train // self.batch_size))
        return per_epoch * (self.n_epochs if self.n_epochs is not None else 3)


@dataclass(frozen=True)
class TrainEvent:
    """Progress the trainer reports (the job runner stores it as a job event)."""

    step: int
    total_steps: int
    train_loss: float | None = None
    val_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    message: str = ""

    def data(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "message"}


@dataclass
class TrainCallbacks:
    """Hooks the trainer calls on its own thread; each defaults to doing nothing."""

    on_event: Callable[[TrainEvent], None] = lambda _e: None
    # Called every step; returning True stops training with TrainingCancelled.
    should_stop: Callable[[], bool] = lambda: False
    # Called every `checkpoint_every` steps with (step, prefix, metrics, state); prefix is a prefix_store PrefixKV,
    # state an app.training.train_state.TrainState (what `train_prefix(resume=...)` continues from).
    on_checkpoint: Callable[[int, Any, dict[str, float], Any], None] = lambda _s, _p, _m, _t: None


@dataclass(frozen=True)
class TrainResult:
    """What training produced: the projected prefix (a prefix_store PrefixKV [L, H_kv, P, D]) and facts."""

    prefix: Any
    steps: int
    trained_tokens: int
    final_train_loss: float | None
    best_val_loss: float | None
    stop_reason: StopReason
    metrics: dict[str, float] = field(default_factory=dict)
