"""Build the engine for a loaded model with the limits from Settings."""

from __future__ import annotations

from typing import Any

from app.config import Settings
from app.engine.admission import EngineLimits
from app.engine.detok import Decoder
from app.engine.loop import Engine
from app.engine.model import LoadedModel
from app.engine.runner import geometry_of


def context_length(loaded: LoadedModel) -> int:
    cfg = loaded.model.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    return int(n)


def build_engine(loaded: LoadedModel, *, settings: Settings | None = None, **overrides: float) -> Engine:
    """An engine (not started) on `loaded`; limits from `settings`, then keyword overrides."""
    limits: dict[str, Any] = {"max_positions": context_length(loaded)}
    if settings is not None:
        limits |= {
            "max_batch_rows": settings.max_batch_rows,
            "max_batch_tokens": settings.max_batch_tokens,
            "max_waiting": settings.max_waiting,
            "request_timeout_s": settings.request_timeout_s,
        }
    limits |= overrides
    pad = loaded.tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token id")
    tokenizer: Decoder = loaded.tokenizer  # type: ignore[assignment]  # decode() returns str for a flat list
    return Engine(
        loaded.model,
        tokenizer,
        geometry=geometry_of(loaded.model, loaded.device, loaded.dtype),
        pad_token_id=int(pad),
        eos_token_ids=loaded.eos_token_ids,
        limits=EngineLimits(**limits),
    )
