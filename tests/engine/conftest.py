"""Engine fixtures: the tiny random presets (fresh per test) and the embedded SmolLM2 (once per session).

The embedded model's GGUF is converted once into a session-scoped data dir (~30 s on 2 cores); every later
load in the session reads the safetensors cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.engine.model import LoadedModel, load_model
from app.engine.sources import EMBEDDED_MODEL


@pytest.fixture
def tiny_llama(tmp_path: Path) -> LoadedModel:
    """random:tiny-llama: 2 layers, 4 query / 2 KV heads, head_dim 16, vocab 512, float32 on CPU."""
    return load_model("random:tiny-llama", data_dir=tmp_path)


@pytest.fixture
def tiny_gpt2(tmp_path: Path) -> LoadedModel:
    """random:tiny-gpt2: 2 layers, 4 heads, n_embd 64, vocab 512, float32 on CPU."""
    return load_model("random:tiny-gpt2", data_dir=tmp_path)


@pytest.fixture(scope="session")
def embedded_model(embedded_data_dir: Path) -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct, float32 on CPU. Shared: tests must not modify it."""
    return load_model(EMBEDDED_MODEL, data_dir=embedded_data_dir)
