"""A training job's configuration as stored on its row, and back: the one mapping the API and the worker share.

The API validates a request into a TrainConfig and stores it with `job_columns` (JSON on the TrainingJob row:
`hyperparameters` holds the optimisation settings, `options` the prefix and data options plus the seed and the
warm-start reference); the worker rebuilds the same TrainConfig with `config_from_job`. Keys that are not
TrainConfig fields (e.g. `learning_rate_multiplier`, kept for display) are ignored on the way back, and fields
missing from an older row take TrainConfig's defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final, Protocol

from app.jobs.types import TrainConfig

# TrainConfig fields stored under `options`; every other field goes under `hyperparameters`.
OPTION_FIELDS: Final = frozenset({
    "num_virtual_tokens", "prefix_projection", "encoder_hidden_size", "validation_split",
    "early_stopping_patience", "seed", "prefix_init",
})
WARM_START_KEY: Final = "warm_start"  # options key: the pinned `name@version` to start from, or absent/None


class JobRow(Protocol):
    """The columns read here (app.db.models.TrainingJob has them)."""

    hyperparameters: dict[str, Any]
    options: dict[str, Any]


def _field_names() -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(TrainConfig))


def job_columns(
    config: TrainConfig, *, warm_start: str | None = None, display: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hyperparameters, options) JSON for a job row. `display`: extra hyperparameter keys to keep as given
    (e.g. OpenAI's `learning_rate_multiplier`); they never override a TrainConfig field."""
    values = dataclasses.asdict(config)
    hyper = {**(display or {}), **{k: v for k, v in values.items() if k not in OPTION_FIELDS}}
    options: dict[str, Any] = {k: v for k, v in values.items() if k in OPTION_FIELDS}
    options[WARM_START_KEY] = warm_start
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
