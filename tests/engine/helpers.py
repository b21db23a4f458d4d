"""Helpers for engine tests: build an engine on a loaded model, random prefixes, run requests to the end."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from app.engine.factory import build_engine
from app.engine.loop import Engine
from app.engine.types import GenerationRequest, TokenEvent
from prefix_store.types import PrefixKV


def make_engine(loaded, **limits: float | bool) -> Engine:
    """A started engine on `loaded` (the production factory), with limits overridden for the test."""
    eng = build_engine(loaded, **limits)
    eng.start()
    return eng


def random_prefix(loaded, num_virtual_tokens: int, seed: int, scale: float = 1.0) -> PrefixKV:
    """A prefix of the model's shape with N(0, scale^2) keys/values: [L, H_kv, P, D]."""
    s = loaded.spec
    gen = torch.Generator().manual_seed(seed)
    shape = (s.num_layers, s.num_kv_heads, num_virtual_tokens, s.head_dim)
    return PrefixKV(
        keys=torch.randn(shape, generator=gen) * scale,
        values=torch.randn(shape, generator=gen) * scale,
        base_fingerprint=s.fingerprint,
    )


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    final: TokenEvent | None = None


async def collect(engine: Engine, request: GenerationRequest, delay: float = 0.0) -> Result:
    """Submit after `delay` seconds and gather every event of the request."""
    await asyncio.sleep(delay)
    out = Result()
    async for ev in engine.submit(request):
        if ev.token_id is not None:
            out.tokens.append(ev.token_id)
            if ev.logprob is not None:
                out.logprobs.append(ev.logprob)
        out.text += ev.text
        if ev.final:
            out.final = ev
    return out
