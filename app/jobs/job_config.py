"""A training job's configuration as stored on its row, and back: the one mapping the API and the worker share.

The API validates a request into a TrainConfig and stores it with `job_columns` (JSON on the TrainingJob row:
`hyperparameters` holds the optimisation settings, `options` the prefix and data options plus the seed, the
warm-start reference and the frozen base the prefix is trained on top of); the worker rebuilds the same
TrainConfig with `config_from_job`. Keys that are not TrainConfig fields (e.g. `learning_rate_multiplier`, kept
for display) are ignored on the way back, and fields missing from an older row take TrainConfig's defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Final, Protocol

from app.jobs.types import TrainConfig
from prefix_store.ref import ON_TOP_OF_KEY, BaseRef, bases_from_json, stack_label

# TrainConfig fields stored under `options`; every other field goes under `hyperparameters`.
OPTION_FIELDS: Final = frozenset({
    "num_virtual_tokens", "prefix_projection", "encoder_hidden_size", "validation_split",
    "early_stopping_patience", "seed", "prefix_init", "kind",
})
WARM_START_KEY: Final = "warm_start"  # options key: the pinned `name@version` to start from, or absent/None


class JobRow(Protocol):
    """The columns read here (app.db.models.TrainingJob has them)."""

    hyperparameters: dict[str, Any]
    options: dict[str, Any]


def _field_names() -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(TrainConfig))


def job_columns(
    config: TrainConfig, *, warm_start: str | None = None, display: dict[str, Any] | None = None,
    on_top_of: Sequence[BaseRef] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hyperparameters, options) JSON for a job row. `display`: extra hyperparameter keys to keep as given
    (e.g. OpenAI's `learning_rate_multiplier`); they never override a TrainConfig field. `on_top_of`: the pinned
    base versions (a stack, first part first) the prefix is trained behind; the catalog reads them back for the
    version the job publishes (prefix_store/ref.py ON_TOP_OF_KEY)."""
    values = dataclasses.asdict(config)
    hyper = {**(display or {}), **{k: v for k, v in values.items() if k not in OPTION_FIELDS}}
    options: dict[str, Any] = {k: v for k, v in values.items() if k in OPTION_FIELDS}
    options[WARM_START_KEY] = warm_start
    if on_top_of:
        options[ON_TOP_OF_KEY] = [b.to_json() for b in on_top_of]
    return hyper, options


def config_from_job(job: JobRow) -> TrainConfig:
    """The TrainConfig a job row was created with (unknown keys ignored, missing ones defaulted)."""
    names = _field_names()
    stored = {**(job.hyperparameters or {}), **(job.options or {})}
    return TrainConfig(**{k: v for k, v in stored.items() if k in names})


def warm_start_of(job: JobRow) -> str | None:
    """The prefix reference (`name@version`, possibly `user:<id>@version`) the job starts from, if any."""
    ref = (job.options or {}).get(WARM_START_KEY)
    return ref if isinstance(ref, str) and ref else None


def bases_of(job: JobRow) -> tuple[BaseRef, ...]:
    """The frozen base versions the job trains on top of, first part first; () for none."""
    return bases_from_json((job.options or {}).get(ON_TOP_OF_KEY))


def on_top_of_label(job: JobRow) -> str | None:
    """`support-bot@3` (a stack: `a@1+b@2`), as the job object shows it; None without a base."""
    return stack_label(bases_of(job)) or None
