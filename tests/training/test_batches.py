"""Seeded validation hold-out and batch order: deterministic, complete, and length-bucketed."""

from __future__ import annotations

import itertools
import random

import pytest

from app.training.batches import batch_stream, epoch_batches, eval_batches, split_validation
from tests.training.helpers import example


def _data(n: int) -> list:
    rng = random.Random(0)
    return [example([i % 500] * rng.randint(1, 40), [1]) for i in range(n)]


def test_split_validation_is_seeded_and_disjoint() -> None:
    data = _data(50)
    train, val = split_validation(data, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert {id(x) for x in train}.isdisjoint(id(x) for x in val)
    assert split_validation(data, 0.2, seed=3) == (train, val)
    assert split_validation(data, 0.2, seed=4)[1] != val
    assert split_validation(data, 0.0, seed=3) == (data, [])
    assert len(split_validation(data[:2], 0.01, seed=0)[1]) == 1  # at least one held out...
    assert len(split_validation(data[:2], 0.9, seed=0)[0]) == 1  # ...and never everything
    with pytest.raises(ValueError, match="validation_split"):
        split_validation(data, 1.0, seed=0)


@pytest.mark.parametrize("bucket", [False, True])
def test_an_epoch_uses_every_example_once(bucket) -> None:
    data = _data(101)
    batches = epoch_batches(data, 8, random.Random(1), bucket=bucket)
    assert sorted(id(x) for b in batches for x in b) == sorted(id(x) for x in data)
    assert sorted(len(b) for b in batches) == [5] + [8] * 12


def test_stream_is_deterministic_and_reshuffles_each_epoch() -> None:
    data = _data(40)
    first = list(itertools.islice(batch_stream(data, 8, seed=2), 10))
    again = list(itertools.islice(batch_stream(data, 8, seed=2), 10))
    assert [[id(x) for x in b] for b in first] == [[id(x) for x in b] for b in again]
    assert [[id(x) for x in b] for b in first[:5]] != [[id(x) for x in b] for b in first[5:]]
    other = list(itertools.islice(batch_stream(data, 8, seed=3), 10))
    assert [[id(x) for x in b] for b in other] != [[id(x) for x in b] for b in first]


def _padding(batches: list) -> int:
    return sum(max(len(x.input_ids) for x in b) * len(b) - sum(len(x.input_ids) for x in b) for b in batches)


def test_bucketing_reduces_padding() -> None:
    data = _data(256)
    plain = _padding(epoch_batches(data, 8, random.Random(0), bucket=False))
    bucketed = _padding(epoch_batches(data, 8, random.Random(0), bucket=True))
    assert bucketed < plain / 3


def test_eval_batches_cover_the_set_sorted_by_length() -> None:
    data = _data(21)
    batches = eval_batches(data, 4)
    flat = [x for b in batches for x in b]
    assert sorted(map(id, flat)) == sorted(map(id, data))
    assert [len(x.input_ids) for x in flat] == sorted(len(x.input_ids) for x in data)
