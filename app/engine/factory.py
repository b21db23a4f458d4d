"""Build the engine for a loaded model. The composition root (app/runtime.py) turns the settings into the
limits; the engine knows nothing of them."""

from __future__ import annotations

import logging
from typing import Any

import torch

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


def build_engine(loaded: LoadedModel, *, packed_linears: bool = True, **limits: Any) -> Engine:
    """An engine (not started) on `loaded`; `limits`: EngineLimits fields (max_positions defaults to the
    model's context length).

    `packed_linears` packs the model's CPU fp32 linear layers for inference in place
    (app/engine/packed_linear.py); training through the same model object is unaffected.
    """
    limits = {"max_positions": context_length(loaded), **limits}
    pad = loaded.tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token id")
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
