"""Build the engine for a loaded model with the limits from Settings."""

from __future__ import annotations

import logging
from typing import Any

import torch

from app.config import Settings
from app.engine.admission import EngineLimits
from app.engine.detok import Decoder
from app.engine.loop import Engine
from app.engine.model import LoadedModel
from app.engine.packed_linear import pack_linears
from app.engine.runner import geometry_of

log = logging.getLogger(__name__)


def context_length(loaded: LoadedModel) -> int:
    cfg = loaded.model.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    return int(n)


def build_engine(
    loaded: LoadedModel, *, settings: Settings | None = None, packed_linears: bool | None = None, **overrides: float
) -> Engine:
    """An engine (not started) on `loaded`; limits from `settings`, then keyword overrides.

    `packed_linears` (default: the setting, else on) packs the model's CPU fp32 linear layers for inference in
    place (app/engine/packed_linear.py); training through the same model object is unaffected.
    """
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
    if packed_linears is None:
        packed_linears = settings.cpu_packed_linears if settings is not None else True
    if packed_linears and loaded.device.type == "cpu" and loaded.dtype == torch.float32:
        n = pack_linears(loaded.model)
        log.info("packed %d linear layers for CPU inference (oneDNN)", n)
    tokenizer: Decoder = loaded.tokenizer  # type: ignore[assignment]  # decode() returns str for a flat list
    return Engine(
        loaded.model,
        tokenizer,
        geometry=geometry_of(loaded.model, loaded.device, loaded.dtype),
        pad_token_id=int(pad),
        eos_token_ids=loaded.eos_token_ids,
        limits=EngineLimits(**limits),
    )
