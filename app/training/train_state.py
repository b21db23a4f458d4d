"""A training run's whole state at a step, so that an interrupted job resumes exactly where it stopped.

A checkpoint used to hold the prefix only: a resumed attempt restarted AdamW's moments, the learning-rate
warm-up and the data order, and ended with another prefix than an uninterrupted run. A checkpoint now also
carries the prefix's parameters (with a projection MLP they are more than the exported KV), the optimizer and
scheduler state, the loop's progress (loss window, token counts, best validation prefix) and, implicitly, the
data position (the seeded batch stream is replayed up to the step). Restored on the same run (same config and
examples, checked by `run_key`), a resumed run is bit-identical on CPU to one that was never interrupted.

The checkpoint blob (the row's sha256, stored and collected like any other blob) is a torch zip
(`prefixserve-train-checkpoint/1`) that embeds the native prefix bytes; a blob of the older kind is the native
prefix alone and resumes as before (fresh optimizer and warm-up).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from app.jobs.types import TokenizedExample, TrainConfig
from prefix_store.types import PrefixKV, PrefixTensors, SoftPrompt

FORMAT = "prefixserve-train-checkpoint/1"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's container; a native prefix (safetensors) starts with its header length
LOSS_WINDOW = 10  # steps in the running mean reported as train_loss


@dataclass
class Progress:
    """What the training loop has seen so far."""

    losses: deque[float] = field(default_factory=lambda: deque(maxlen=LOSS_WINDOW))
    trained_tokens: int = 0
    target_tokens: int = 0
    seconds: float = 0.0
    last_val: float | None = None
    best_val: float | None = None
    best_step: int = 0
    best_prefix: PrefixTensors | None = None
    bad_evals: int = 0

    @property
    def train_loss(self) -> float | None:
        return sum(self.losses) / len(self.losses) if self.losses else None

    def state(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "best_prefix"}
        out["losses"] = list(self.losses)
        best = self.best_prefix
        common = None if best is None else {
            "base_fingerprint": best.base_fingerprint, "created_by": best.created_by, "metadata": dict(best.metadata)}
        if isinstance(best, SoftPrompt):
            out["best_prefix"] = {**(common or {}), "embeddings": best.embeddings.clone(), "kind": best.kind}
        else:
            out["best_prefix"] = None if best is None else {
                **(common or {}), "keys": best.keys.clone(), "values": best.values.clone()}
        return out

    def load(self, state: dict[str, Any]) -> None:
        self.losses = deque(state["losses"], maxlen=LOSS_WINDOW)
        for name in ("trained_tokens", "target_tokens", "seconds", "last_val", "best_val", "best_step", "bad_evals"):
            setattr(self, name, state[name])
        best = state["best_prefix"]
        if best is None:
            self.best_prefix = None
        else:
            self.best_prefix = SoftPrompt(**best) if "embeddings" in best else PrefixKV(**best)


@dataclass(frozen=True)
class TrainState:
    """Everything `_Run` needs to continue after `step` steps; `key` names the run it belongs to."""

    key: str
    step: int
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    progress: dict[str, Any]


def run_key(config: TrainConfig, train: Sequence[TokenizedExample], val: Sequence[TokenizedExample]) -> str:
    """What a state is only valid for: the config and the exact examples (a personal job re-reads its user's
    examples on every attempt, and they may have changed)."""
    digest = hashlib.sha256()
    for part in (train, val):
        digest.update(f"|{len(part)}|".encode())
        for ex in part:
            digest.update(array("q", ex.input_ids).tobytes())
            digest.update(bytes(ex.loss_mask))
    return f"{sorted(dataclasses.asdict(config).items())}:{digest.hexdigest()}"


def snapshot(*, key: str, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, progress: Progress) -> TrainState:
    """A copy on the CPU (the run goes on changing its tensors in place)."""
    return TrainState(key=key, step=step, params=_cpu(module.state_dict()), optimizer=_cpu(optimizer.state_dict()),
                      scheduler=dict(scheduler.state_dict()), progress=progress.state())


def restore(state: TrainState, *, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, progress: Progress,
            batches: Iterator[object]) -> None:
    """Put a fresh run (built exactly like the one that saved `state`) where that run was after `state.step`."""
    module.load_state_dict(state.params)
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    progress.load(state.progress)
    for _ in range(state.step):  # the seeded stream replays the batches already trained on
        next(batches)


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def encode_checkpoint(native: bytes, state: TrainState | None) -> bytes:
    """The checkpoint blob: the native prefix alone, or with the run's state."""
    if state is None:
        return native
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "prefix": torch.frombuffer(bytearray(native), dtype=torch.uint8),
                **dataclasses.asdict(state)}, buf)
    return buf.getvalue()


def decode_checkpoint(data: bytes) -> tuple[bytes, TrainState | None]:
    """(the native prefix bytes, the state or None for an older prefix-only checkpoint). Raises ValueError for a
    blob that is neither."""
    if not data.startswith(_ZIP_MAGIC):
        return data, None
    try:
        # weights_only: tensors and plain containers only, never arbitrary pickled objects
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"unreadable training checkpoint: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError("not a prefixserve training checkpoint")
    try:
        native = obj.pop("prefix").numpy().tobytes()
        obj.pop("format")
        return native, TrainState(**obj)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"incomplete training checkpoint: {exc!r}") from None
