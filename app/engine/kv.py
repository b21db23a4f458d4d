"""The batch's KV cache: a transformers `Cache` whose layers write into preallocated slabs.

transformers' `DynamicLayer` concatenates on every step (a full copy of the cache per token and layer). A slab
layer keeps `[B, H_kv, capacity, D]` buffers and writes each step's keys/values in place, growing by doubling,
so a decode step costs O(new tokens), not O(cache). The batch verbs (concatenate, filter) write straight into
new slabs (`SlabCache.allocate`): one copy of the KV per join or leave.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

_MIN_CAPACITY = 64


def _grow(buf: torch.Tensor, length: int, needed: int) -> torch.Tensor:
    """Return a buffer with room for `needed` tokens holding the first `length` tokens of `buf`."""
    capacity = max(_MIN_CAPACITY, buf.shape[2] * 2, needed)
    out = buf.new_empty((buf.shape[0], buf.shape[1], capacity, buf.shape[3]))
    out[:, :, :length] = buf[:, :, :length]
    return out


class SlabLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """One layer's cache: keys/values slabs [B, H_kv, capacity, D], of which the first `length` are valid."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.keys = keys
        self.values = values
        self.length = length
        self.device = keys.device
        self.dtype = keys.dtype
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value states [B, H_kv, Q, D]; return views of all valid keys/values [B, H_kv, T+Q, D]."""
        assert self.keys is not None and self.values is not None
        end = self.length + key_states.shape[2]
        self.reserve(end)
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def reserve(self, end: int) -> None:
        """Grow the slabs (by doubling) until they hold `end` tokens; the valid part is kept."""
        assert self.keys is not None and self.values is not None
        if end > self.keys.shape[2]:
            self.keys = _grow(self.keys, self.length, end)
            self.values = _grow(self.values, self.length, end)

    def get_seq_length(self) -> int:
        return self.length

    def valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the valid part: keys, values [B, H_kv, length, D]."""
        assert self.keys is not None and self.values is not None
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]


class SlabCache(DynamicCache):
    """A cache of `SlabLayer`s, one per decoder layer, all of the same length."""

    def __init__(self, layers: list[SlabLayer]) -> None:
        # Bypass DynamicCache.__init__ (it would build DynamicLayers); Cache.__init__ takes ready layers.
        super(DynamicCache, self).__init__(layers=layers)  # type: ignore[arg-type]

    @classmethod
    def allocate(
        cls, *, num_layers: int, shape: tuple[int, int, int, int], headroom: int, dtype: torch.dtype,
        device: torch.device,
    ) -> SlabCache:
        """Per layer, uninitialised slabs for `shape` = (B, H_kv, T, D) with room for `headroom` more tokens; the
        first T tokens count as valid, so the caller must fill them (batch.py writes every valid column once)."""
        b, h, t, d = shape
        capacity = max(_MIN_CAPACITY, t + headroom)
        layers = []
        for _ in range(num_layers):
            kb = torch.empty((b, h, capacity, d), dtype=dtype, device=device)
            layers.append(SlabLayer(kb, torch.empty_like(kb), t))
        return cls(layers)

    @property
    def slabs(self) -> list[SlabLayer]:
        return self.layers  # type: ignore[return-value]

    @property
    def length(self) -> int:
        return self.slabs[0].length if self.slabs else 0

    def reserve(self, new_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Room for `new_tokens` more in every layer, for a forward that writes them into the slabs itself
        (app/engine/quantized_layers.py) at columns `length .. length + new_tokens - 1`; then `advance`.
        Returns every layer's whole key and value slabs, [B, H_kv, capacity, D] each."""
        end = self.length + new_tokens
        for slab in self.slabs:
            slab.reserve(end)
        return [s.keys for s in self.slabs], [s.values for s in self.slabs]  # type: ignore[misc]

    def advance(self, new_tokens: int) -> None:
        """Count `new_tokens` written past the valid part (after `reserve`) as valid."""
        for slab in self.slabs:
            slab.length += new_tokens
