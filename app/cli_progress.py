"""What `prefixserve train` shows: a live progress bar fed by a job's events, and the summary at the end.

Both modes (against a server, and in-process) produce the same OpenAI-shaped event and job dicts
(`fine_tuning.job.event`, `fine_tuning.job`), so one view serves both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@dataclass(frozen=True)
class TrainOptions:
    """The job a `prefixserve train` run creates; `body` is the `POST /v1/fine_tuning/jobs` request."""

    name: str
    model: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # seed, num_virtual_tokens, warm_start, ...

    def body(self, *, model: str, training_file: str, validation_file: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": model, "training_file": training_file, "suffix": self.name}
        if validation_file is not None:
            out["validation_file"] = validation_file
        hyper = {k: v for k, v in self.hyperparameters.items() if v is not None}
        if hyper:
            out["hyperparameters"] = hyper
        out.update({k: v for k, v in self.options.items() if v is not None})
        return out


class JobProgress:
    """A rich progress bar (step/total, loss, elapsed, ETA) plus the job's non-metric events as lines."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started = time.monotonic()
        self.last_metrics: dict[str, Any] = {}
        self.seen: set[str] = set()
        self._progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> JobProgress:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def event(self, event: dict[str, Any]) -> None:
        """Show one `fine_tuning.job.event` (each id once: a reconnecting stream may repeat some)."""
        event_id = str(event.get("id", ""))
        if event_id and event_id in self.seen:
            return
        self.seen.add(event_id)
        data = event.get("data") or {}
        if "step" in data and "total_steps" in data:
            self._metrics(data)
            return
        level = event.get("level", "info")
        style = {"error": "red", "warn": "yellow"}.get(level, "dim")
        self._progress.console.print(f"[{style}]{event.get('message', '')}[/{style}]")

    def _metrics(self, data: dict[str, Any]) -> None:
        self.last_metrics.update(data)
        loss = data.get("train_loss")
        shown = f"{loss:.4f}" if isinstance(loss, int | float) else "-"
        if self._task is None:
            self._task = self._progress.add_task("train", total=data["total_steps"], loss=shown)
        self._progress.update(self._task, total=data["total_steps"], completed=data["step"], loss=shown)


def summary(job: dict[str, Any], progress: JobProgress) -> tuple[str, bool]:
    """(the summary text, whether the job succeeded) for a finished `fine_tuning.job`."""
    seconds = time.monotonic() - progress.started
    m = progress.last_metrics
    status = job.get("status")
    lines = [f"job {job.get('id')} {status} after {seconds:.1f} s"]
    if m:
        losses = [f"final train loss {m['train_loss']:.4f}" if "train_loss" in m else "",
                  f"val loss {m['val_loss']:.4f}" if "val_loss" in m else ""]
        lines.append(f"  steps: {m.get('step')}/{m.get('total_steps')}; " + ", ".join(x for x in losses if x))
    if job.get("trained_tokens"):
        lines.append(f"  trained tokens: {job['trained_tokens']}")
    if status == "succeeded":
        lines.append(f"  use it with: model = \"{job.get('fine_tuned_model')}\"")
    error = job.get("error")
    if error:
        lines.append(f"  error ({error.get('code')}): {error.get('message')}")
    return "\n".join(lines), status == "succeeded"
