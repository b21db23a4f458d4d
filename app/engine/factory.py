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
from app.engine.model_errors import ModelLoadError
from app.engine.packed_linear import pack_linears
from app.engine.quantized_decoder import KV_DTYPE, build_quantized
from app.engine.runner import ModelRunner, geometry_of

log = logging.getLogger(__name__)


def context_length(loaded: LoadedModel) -> int:
    cfg = loaded.model.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    return int(n)


def build_engine(loaded: LoadedModel, *, packed_linears: bool = True, weights: str = "fp32", **limits: Any) -> Engine:
    """An engine (not started) on `loaded`; `limits`: EngineLimits fields (max_positions defaults to the
    model's context length).

    `weights`: "fp32" serves the model as loaded; "int4" / "int8" serve a quantized copy of its linear layers
    through app/engine/quantized_decoder.py (CPU, Llama family; int4 keeps a GGUF's 4-bit blocks as they are).
    `packed_linears` (fp32 only) packs the model's CPU fp32 linear layers for inference in place
    (app/engine/packed_linear.py). Training through the same model object is unaffected by either.
    """
    limits = {"max_positions": context_length(loaded), **limits}
    pad = loaded.tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token id")
    serving = None
    if weights != "fp32":
        try:
            serving = build_quantized(loaded.model, weights, loaded.gguf_path)
        except ValueError as exc:  # an unsupported model or device, a GGUF that is not the loaded model
            raise ModelLoadError(f"weights {weights!r}: {exc}") from exc
    elif packed_linears and loaded.device.type == "cpu" and loaded.dtype == torch.float32:
        n = pack_linears(loaded.model)
        log.info("packed %d linear layers for CPU inference (oneDNN)", n)
    tokenizer: Decoder = loaded.tokenizer  # type: ignore[assignment]  # decode() returns str for a flat list
    kv_dtype = KV_DTYPE if serving is not None else loaded.dtype
    engine = Engine(
        loaded.model,
        tokenizer,
        geometry=geometry_of(loaded.model, loaded.device, kv_dtype),
        pad_token_id=int(pad),
        eos_token_ids=loaded.eos_token_ids,
        limits=EngineLimits(**limits),
    )
    if serving is not None:
        engine.runner = ModelRunner(loaded.model, serving)
    return engine
