"""Trainer fixtures: the tiny random presets, loaded once per session, and the job runner's environments.

They are shared by every test in the session, which is itself a check: the trainer must leave the base model
exactly as it found it (frozen, eval mode, same weights).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.engine.model import LoadedModel, load_model
from tests.training.job_support import JobEnv, open_env


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """random:tiny-llama: 2 layers, 4 query / 2 KV heads, head_dim 16, vocab 512, float32 on CPU."""
    return load_model("random:tiny-llama", data_dir=tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """random:tiny-gpt2: 2 layers, 4 heads, n_embd 64, vocab 512, float32 on CPU."""
    return load_model("random:tiny-gpt2", data_dir=tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    """Each tiny model in turn (Llama: GQA + RoPE; GPT-2: learned positions)."""
    model: LoadedModel = request.getfixturevalue(request.param)
    return model


@pytest.fixture(params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, tmp_path: Path, tiny_llama: LoadedModel) -> Iterator[JobEnv]:
    """A job runner's database (SQLite, then PostgreSQL), blob store, tenant and the tiny Llama."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if request.param == "sqlite" else request.getfixturevalue(
        "postgres_url")
    yield from open_env(url, tmp_path, tiny_llama)


@pytest.fixture
def sqlite_env(tmp_path: Path, tiny_llama: LoadedModel) -> Iterator[JobEnv]:
    yield from open_env(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, tiny_llama)
