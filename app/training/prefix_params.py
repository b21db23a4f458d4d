"""The trainable prefix: a per-layer KV block (docs/prefix-format.md) as a torch module.

Two parameterizations, with HF PEFT's module layout (`embedding`, `transform`), so a state dict loads into
peft's `PrefixEncoder` and both export the same projected KV:
  - direct: `embedding.weight` [P, L*2*token_dim] *is* the flat prefix (PEFT, prefix_projection=False);
  - projection (Li & Liang 2021): Embedding(P, token_dim) -> Linear(token_dim, E) -> Tanh -> Linear(E, L*2*token_dim)
    (PEFT, prefix_projection=True). A warm start adds the initial flat prefix as a fixed `offset` and zeroes the
    last Linear, so the module reproduces the init exactly before the first step.

token_dim = num_kv_heads * head_dim; the flat layout is PEFT's, shared with prefix_store.peft_codec.
"""

from __future__ import annotations

import math

import torch

from prefix_store.peft_codec import flat_to_kv, kv_to_flat
from prefix_store.types import ModelSpec, PrefixKV

CREATED_BY = "prefixserve-trainer"


def _linear(fan_in: int, fan_out: int, gen: torch.Generator, device: torch.device) -> torch.nn.Linear:
    """nn.Linear with torch's default init drawn from `gen` (not the process-global RNG, which other threads use)."""
    layer = torch.nn.Linear(fan_in, fan_out, device="meta").to_empty(device=device)  # meta: no global-RNG init
    torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=gen)
    bound = 1 / math.sqrt(fan_in)
    torch.nn.init.uniform_(layer.bias, -bound, bound, generator=gen)
    return layer


def _embedding(rows: int, dim: int, gen: torch.Generator, device: torch.device) -> torch.nn.Embedding:
    """nn.Embedding with its default N(0, 1) init drawn from `gen`."""
    emb = torch.nn.Embedding(rows, dim, device="meta").to_empty(device=device)
    torch.nn.init.normal_(emb.weight, generator=gen)
    return emb


class PrefixParameters(torch.nn.Module):
    """The trainable prefix for one base model; parameters are float32 on `device` whatever the model's dtype."""

    offset: torch.Tensor | None

    def __init__(
        self,
        spec: ModelSpec,
        num_virtual_tokens: int,
        *,
        projection: bool = False,
        encoder_hidden_size: int | None = None,
        init: PrefixKV | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        """`init` (a PrefixKV of this spec with P = num_virtual_tokens) warm-starts; `seed` draws the rest."""
        super().__init__()
        if num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be at least 1, got {num_virtual_tokens}")
        self.spec = spec
        self.num_virtual_tokens = num_virtual_tokens
        self.projection = projection
        # Drawn on the CPU from a private generator, then moved: the same values on every device, and the
        # process-global RNG (used by other threads) is left alone.
        gen = torch.Generator().manual_seed(seed)
        cpu = torch.device("cpu")
        flat_dim = spec.num_layers * 2 * spec.token_dim
        init_flat = self._init_flat(init) if init is not None else None
        self.transform: torch.nn.Sequential | None = None
        self.register_buffer("offset", None)
        if not projection:
            self.embedding = _embedding(num_virtual_tokens, flat_dim, gen, cpu)
            if init_flat is not None:
                with torch.no_grad():
                    self.embedding.weight.copy_(init_flat)
        else:
            hidden = encoder_hidden_size or spec.token_dim  # PEFT's default width
            self.embedding = _embedding(num_virtual_tokens, spec.token_dim, gen, cpu)
            last = _linear(hidden, flat_dim, gen, cpu)
            self.transform = torch.nn.Sequential(_linear(spec.token_dim, hidden, gen, cpu), torch.nn.Tanh(), last)
            if init_flat is not None:
                # Zero output layer: the MLP adds exactly 0 at step 0; its gradient is still non-zero (tanh(h) != 0).
                torch.nn.init.zeros_(last.weight)
                torch.nn.init.zeros_(last.bias)
                self.offset = init_flat
        self.to(torch.device(device))

    def _init_flat(self, init: PrefixKV) -> torch.Tensor:
        """The warm-start prefix as PEFT's flat [P, L*2*token_dim] float32 tensor, checked against the spec."""
        s = self.spec
        expected = (s.num_layers, s.num_kv_heads, self.num_virtual_tokens, s.head_dim)
        if tuple(init.keys.shape) != expected or tuple(init.values.shape) != expected:
            raise ValueError(
                f"warm-start prefix has shape {list(init.keys.shape)}, expected [layers, kv_heads, P, head_dim] = "
                f"{list(expected)} (num_virtual_tokens must equal the warm-start prefix's)"
            )
        if init.base_fingerprint is not None and init.base_fingerprint != s.fingerprint:
            raise ValueError(f"warm-start prefix belongs to another base model than {s.model_id!r}")
        return kv_to_flat(init.keys.detach().float().cpu(), init.values.detach().float().cpu()).contiguous()

    def flat(self) -> torch.Tensor:
        """The flat prefix [P, L*2*token_dim] (float32, with grad): PEFT's `prompt_embeddings`."""
        if self.transform is None:
            return self.embedding.weight
        out: torch.Tensor = self.transform(self.embedding.weight)
        return out if self.offset is None else self.offset + out

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values: each [L, H_kv, P, head_dim], float32, differentiable w.r.t. the parameters."""
        return flat_to_kv(self.flat(), self.spec)

    @torch.no_grad()
    def export(self, metadata: dict[str, str] | None = None) -> PrefixKV:
        """A detached float32 CPU PrefixKV [L, H_kv, P, head_dim] of the projected prefix (what is stored/served)."""
        keys, values = self.kv()
        return PrefixKV(
            keys=keys.detach().to(device="cpu", dtype=torch.float32).contiguous(),
            values=values.detach().to(device="cpu", dtype=torch.float32).contiguous(),
            base_fingerprint=self.spec.fingerprint,
            created_by=CREATED_BY,
            metadata=dict(metadata or {}),
        )
