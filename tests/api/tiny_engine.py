"""A real engine client on the random tiny Llama, for HTTP tests whose answers must come from a real engine
(grammar-constrained outputs, tool calls): modules use it in place of the fake engine."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.engine.client import EngineClient
from app.engine.factory import build_engine, context_length
from app.engine.model import load_model


@contextmanager
def tiny_engine_client(data_dir: Path, model_id: str) -> Iterator[EngineClient]:
    """A started engine on random:tiny-llama, served under `model_id`; stopped on exit."""
    loaded = load_model("random:tiny-llama", data_dir=data_dir)
    engine = build_engine(loaded)
    engine.start()
    try:
        yield EngineClient(engine, loaded.tokenizer, None, model_id, context_length(loaded))
    finally:
        engine.stop()
