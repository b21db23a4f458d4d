"""A job's TrainConfig survives the trip through the job row's JSON columns (API writes, worker reads)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

from app.jobs.job_config import OPTION_FIELDS, config_from_job, job_columns, warm_start_of
from app.jobs.types import TrainConfig


def test_round_trip_through_json_columns() -> None:
    config = TrainConfig(num_virtual_tokens=8, prefix_projection=True, encoder_hidden_size=32, learning_rate=1e-3,
                         batch_size=4, max_steps=50, seed=7, early_stopping_patience=None, validation_split=0.2,
                         checkpoint_every=10)
    hyper, options = job_columns(config, warm_start="poet@2", display={"learning_rate_multiplier": 0.5,
                                                                       "learning_rate": 99.0})
    # JSON columns: what the database gives back is what json round-trips.
    job = SimpleNamespace(hyperparameters=json.loads(json.dumps(hyper)), options=json.loads(json.dumps(options)))
    assert config_from_job(job) == config
    assert warm_start_of(job) == "poet@2"
    assert hyper["learning_rate"] == 1e-3 and hyper["learning_rate_multiplier"] == 0.5  # display never overrides
    assert set(options) == OPTION_FIELDS | {"warm_start"}
    assert set(hyper) | set(options) >= {f.name for f in dataclasses.fields(TrainConfig)}


def test_missing_and_unknown_keys() -> None:
    job = SimpleNamespace(hyperparameters={"batch_size": 2, "from_the_future": 1}, options={"warm_start": None})
    assert config_from_job(job) == TrainConfig(batch_size=2)
    assert warm_start_of(job) is None
    assert warm_start_of(SimpleNamespace(hyperparameters={}, options={})) is None
