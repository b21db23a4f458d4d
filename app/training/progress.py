"""The trainer's callbacks for a job: heartbeat, stop requests, rate-limited events, checkpoints.

The heartbeat runs on its own thread, so a job stays alive however long one training step takes; the same
round trip reads the job's cancel flag, so `should_stop` (called by the trainer every step) costs nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa

from app.catalog.versions import delete_unreferenced_blobs
from app.jobs.lease import JobLease, JobLost
from app.jobs.types import TrainCallbacks, TrainEvent
from prefix_store.blobs import BlobStore, BlobStoreUnavailable

if TYPE_CHECKING:
    from app.training.train_state import TrainState
    from prefix_store.types import ModelSpec, PrefixTensors

log = logging.getLogger(__name__)

StopCause = Literal["cancelled", "interrupted", "timeout", "lost"]
EVENT_MIN_INTERVAL_S = 1.0  # at most one step event a second, plus every eval and the first and last step


class Heartbeat:
    """Refresh the job's heartbeat every `interval_s` on a daemon thread and watch for reasons to stop:
    a cancel request, the worker's interrupt (shutdown), the job's deadline, or a lost lease."""

    def __init__(self, lease: JobLease, *, interval_s: float, interrupt: threading.Event | None = None,
                 deadline: float | None = None) -> None:
        self.lease = lease
        self.interval_s = interval_s
        self.interrupt = interrupt or threading.Event()
        self.deadline = deadline  # time.monotonic() value
        self.cause: StopCause | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{lease.job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=self.interval_s + 30)

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                if self.lease.beat():
                    self._stop("cancelled")
            except JobLost:
                self._stop("lost")
                return
            except sa.exc.SQLAlchemyError as exc:
                # A database blip: keep training; the sweep only acts after job_stale_after_s without beats.
                log.warning("job %s: heartbeat failed: %s", self.lease.job_id, exc)

    def _stop(self, cause: StopCause) -> None:
        if self.cause is None:
            self.cause = cause

    def should_stop(self) -> bool:
        """Called by the trainer every step (cheap: no database access)."""
        if self.interrupt.is_set():
            self._stop("interrupted")
        elif self.deadline is not None and time.monotonic() > self.deadline:
            self._stop("timeout")
        return self.cause is not None


class JobReporter:
    """Turns the trainer's events and checkpoints into job events and checkpoint rows."""

    def __init__(self, lease: JobLease, *, blobs: BlobStore, spec: ModelSpec,
                 min_interval_s: float = EVENT_MIN_INTERVAL_S, step_offset: int = 0) -> None:
        self.lease = lease
        self.blobs = blobs
        self.spec = spec
        # A resumed attempt's trainer counts from 1 again; events and checkpoints keep the job's own numbering.
        self.step_offset = step_offset
        self.min_interval_s = min_interval_s
        self.last_event: TrainEvent | None = None
        self._last_written = -float("inf")
        self._heartbeat: Heartbeat | None = None

    def callbacks(self, heartbeat: Heartbeat) -> TrainCallbacks:
        self._heartbeat = heartbeat
        return TrainCallbacks(on_event=self.on_event, should_stop=heartbeat.should_stop,
                              on_checkpoint=self.on_checkpoint)

    def on_event(self, event: TrainEvent) -> None:
        if self.step_offset:
            event = dataclasses.replace(event, step=event.step + self.step_offset,
                                        total_steps=event.total_steps + self.step_offset)
        self.last_event = event
        now = time.monotonic()
        due = event.step <= 1 or event.step >= event.total_steps or event.val_loss is not None
        if not due and now - self._last_written < self.min_interval_s:
            return
        self._last_written = now
        try:
            self.lease.event(describe(event), data=event.data())
        except sa.exc.SQLAlchemyError as exc:
            # A database blip costs a progress line, not the training run (JobLost still ends it).
            log.warning("job %s: event at step %d not written: %s", self.lease.job_id, event.step, exc)

    def on_checkpoint(self, step: int, prefix: PrefixTensors, metrics: dict[str, float],
                      state: TrainState | None = None) -> None:
        """Store the checkpoint's blob (the prefix, plus `state` to resume from) and row. A storage failure costs
        the checkpoint, not the job. Nothing is stored once a cancel was requested: a cancelled job (an end
        user's deletion cancels theirs) must leave no checkpoint behind."""
        # torch: train_state and prefix_store's codec import it, and this module stays torch-free at import
        from app.training.train_state import encode_checkpoint
        from prefix_store.codec import encode_stored  # the same reason

        step += self.step_offset
        if self._heartbeat is not None and self._heartbeat.cause == "cancelled":
            log.info("job %s: cancel requested; checkpoint at step %d skipped", self.lease.job_id, step)
            return
        data = encode_checkpoint(encode_stored(storable(prefix, self.spec)), state)
        try:
            sha = self.blobs.put(data)
        except BlobStoreUnavailable as exc:
            log.warning("job %s: checkpoint at step %d not saved: %s", self.lease.job_id, step, exc)
            self.lease.event(f"checkpoint at step {step} not saved: the object store is unavailable", level="warn")
            return
        try:
            # None: the cancel request reached the database first (the heartbeat has not seen it yet).
            replaced = self.lease.checkpoint(step, sha, metrics)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("job %s: checkpoint at step %d not recorded: %s", self.lease.job_id, step, exc)
            return
        unused = [sha] if replaced is None else replaced
        if unused:
            with self.lease.sessions() as session:
                delete_unreferenced_blobs(session=session, blobs=self.blobs, shas=unused)


def describe(event: TrainEvent) -> str:
    """`step 10/100: train loss 1.2345, val loss 1.3000`."""
    parts = [f"step {event.step}/{event.total_steps}"]
    losses = []
    if event.train_loss is not None:
        losses.append(f"train loss {event.train_loss:.4f}")
    if event.val_loss is not None:
        losses.append(f"val loss {event.val_loss:.4f}")
    text = parts[0] + (": " + ", ".join(losses) if losses else "")
    return f"{text} ({event.message})" if event.message else text


def storable(prefix: PrefixTensors, spec: ModelSpec) -> PrefixTensors:
    """The prefix as the codec stores it: detached contiguous CPU tensors carrying the base model's
    fingerprint (keys/values [L, H_kv, P, D], or a soft prompt's embeddings [P, hidden])."""
    from prefix_store.types import SoftPrompt  # torch: this module stays torch-free at import

    if isinstance(prefix, SoftPrompt):
        return dataclasses.replace(prefix, embeddings=prefix.embeddings.detach().to("cpu").contiguous(),
                                   base_fingerprint=prefix.base_fingerprint or spec.fingerprint)
    return dataclasses.replace(
        prefix,
        keys=prefix.keys.detach().to("cpu").contiguous(),
        values=prefix.values.detach().to("cpu").contiguous(),
        base_fingerprint=prefix.base_fingerprint or spec.fingerprint,
    )
