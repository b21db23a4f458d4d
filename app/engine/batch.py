"""The batch: rows with different prefixes sharing one KV cache (docs/batching.md).

Row i along the KV axis: `[pad | prefix_i | pad | soft_i | prompt_i | generated...]`.
- `attention_mask` is 0 on pads and 1 elsewhere, always `cache length + new tokens` long;
- `position_ids` are `P_i + j` for prompt token j and `P_i + S_i + t` for generated token t, whatever the padding;
- prefix blocks are copied into the batch's own cache (never the stored tensors themselves);
- a soft prompt (learned input embeddings, V_i of them) is not in the cache: its embeddings are the first V_i
  inputs of the row's prefill, at positions 0..V_i-1 (app/engine/soft_inputs.py). A row has a KV prefix or a soft
  prompt, never both, and P_i below counts either kind of virtual tokens.

A value object with three verbs, in the manner of TGI's CausalLMBatch: `from_requests` (a fresh batch ready
for prefill), `concatenate` (merge batches that are between decode steps) and `filter` (keep some rows, trim
columns that became padding for every row). `advance` records the tokens just chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from app.engine.kv import SlabCache
from app.engine.sampling import SamplerState
from app.engine.soft_inputs import SoftInputs, soft_len, stage_soft_prompts
from prefix_store.types import PrefixKV, PrefixTensors


@dataclass(frozen=True)
class KVGeometry:
    """Shape facts of the model's cache."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class NewRow:
    """A request ready to be prefilled: token ids, its (resolved) KV prefix or soft prompt or None, its sampler."""

    request_id: str
    prompt_ids: list[int]
    prefix: PrefixTensors | None
    sampler: SamplerState


@dataclass
class Row:
    """Book-keeping of one row. Positions follow docs/prefix-format.md: real token j sits at position P + j."""

    request_id: str
    prefix_len: int  # P_i: virtual tokens in front, a KV prefix's or a soft prompt's
    prompt_len: int  # S_i
    sampler: SamplerState
    generated: list[int] = field(default_factory=list)

    @property
    def last_position(self) -> int:
        """Position of the newest token in this row (prompt or generated)."""
        return self.prefix_len + self.prompt_len + len(self.generated) - 1


@dataclass
class Batch:
    """Rows that step together.

    input_ids:      [B, Q]      tokens the next forward consumes (Q = longest soft prompt + prompt at prefill, 1 at
                                decode); the pad token at a soft prompt's columns
    position_ids:   [B, Q]
    attention_mask: [B, T + Q]  T = cache.length; 1 on prefix, soft prompt, prompt and generated tokens, 0 on pads
    cache:          per layer keys/values [B, H_kv, T, D]
    soft:           at a prefill with soft-prompt rows, their embeddings [B, Q, hidden] and columns; else None
    """

    rows: list[Row]
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: SlabCache
    soft: SoftInputs | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.rows]

    @classmethod
    def from_requests(cls, new_rows: Sequence[NewRow], *, geometry: KVGeometry, pad_token_id: int) -> Batch:
        """A batch ready for prefill: KV prefixes copied into a fresh cache, soft prompts and prompts left-padded."""
        if not new_rows:
            raise ValueError("from_requests needs at least one row")
        g = geometry
        b = len(new_rows)
        p_lens = [r.prefix.num_virtual_tokens if isinstance(r.prefix, PrefixKV) else 0 for r in new_rows]
        v_lens = [soft_len(r.prefix) for r in new_rows]  # V_i: soft prompt columns in front of the prompt
        s_lens = [len(r.prompt_ids) for r in new_rows]
        q_lens = [v + s for v, s in zip(v_lens, s_lens, strict=True)]
        p_max, s_max = max(p_lens), max(q_lens)  # s_max: the prefill's Q
        if min(s_lens) < 1:
            raise ValueError("every prompt needs at least one token")

        input_ids = torch.full((b, s_max), pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((b, s_max), dtype=torch.long)
        mask = torch.zeros((b, p_max + s_max), dtype=torch.long)
        cache = SlabCache.allocate(num_layers=g.num_layers, shape=(b, g.kv_heads, p_max, g.head_dim),
                                   headroom=s_max + 16, dtype=g.dtype, device=g.device)
        for i, (row, p, s, q) in enumerate(zip(new_rows, p_lens, s_lens, q_lens, strict=True)):
            input_ids[i, s_max - s :] = torch.tensor(row.prompt_ids, dtype=torch.long)
            position_ids[i, s_max - q :] = torch.arange(p, p + q)  # soft prompt at P_i.., prompt after it
            mask[i, p_max - p : p_max] = 1
            mask[i, p_max + s_max - q :] = 1
        # Staged for all layers at once, [L, B, H_kv, P_max, D] (one copy per row instead of one per row and
        # layer); zeros on the pad columns: masked, but they must be finite (0 * NaN would leak through).
        shape = (g.num_layers, b, g.kv_heads, p_max, g.head_dim)
        keys = torch.zeros(shape, dtype=g.dtype, device=g.device)
        values = torch.zeros(shape, dtype=g.dtype, device=g.device)
        for i, (row, p) in enumerate(zip(new_rows, p_lens, strict=True)):
            if isinstance(row.prefix, PrefixKV) and p > 0:
                # prefix.keys: [L, H_kv, P, D] -> right-aligned in the prefix region of row i.
                keys[:, i, :, p_max - p :] = row.prefix.keys
                values[:, i, :, p_max - p :] = row.prefix.values
        for slab, k, v in zip(cache.slabs, keys, values, strict=True):
            k_slab, v_slab = slab.valid()
            k_slab.copy_(k)
            v_slab.copy_(v)
        rows = [
            Row(request_id=r.request_id, prefix_len=p + v, prompt_len=s, sampler=r.sampler)
            for r, p, v, s in zip(new_rows, p_lens, v_lens, s_lens, strict=True)
        ]
        dev = g.device
        soft = stage_soft_prompts([r.prefix for r in new_rows], s_lens, s_max, dev)
        return cls(rows, input_ids.to(dev), position_ids.to(dev), mask.to(dev), cache, soft)

    def advance(self, token_ids: Sequence[int]) -> None:
        """Record one chosen token per row (after a forward) and set up the next decode step."""
        dev = self.input_ids.device
        self.soft = None  # consumed by the prefill: the soft prompts' keys/values are in the cache now
        for row, tok in zip(self.rows, token_ids, strict=True):
            row.generated.append(tok)
        self.input_ids = torch.tensor(token_ids, dtype=torch.long, device=dev).unsqueeze(1)  # [B, 1]
        # Each row's newest token sits one past the last column's position (prompts are left-padded, so the last
        # column is every row's newest real token): P_i + S_i + t, computed where the ids live.
        self.position_ids = self.position_ids[:, -1:] + 1  # [B, 1]
        ones = torch.ones((len(self.rows), 1), dtype=self.attention_mask.dtype, device=dev)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)  # [B, T + 1]

    @classmethod
    def concatenate(cls, batches: Sequence[Batch]) -> Batch:
        """Merge batches that are between decode steps (Q = 1), left-padding caches to the longest."""
        if len(batches) == 1:
            return batches[0]
        t_max = max(bt.cache.length for bt in batches)
        total = sum(len(bt) for bt in batches)
        k_ref, _ = batches[0].cache.slabs[0].valid()  # [B, H_kv, T, D]
        cache = SlabCache.allocate(num_layers=len(batches[0].cache.slabs),
                                   shape=(total, k_ref.shape[1], t_max, k_ref.shape[3]), headroom=64,
                                   dtype=k_ref.dtype, device=k_ref.device)
        for layer_idx, slab in enumerate(cache.slabs):
            k_out, v_out = slab.valid()
            start = 0
            for bt in batches:
                k, v = bt.cache.slabs[layer_idx].valid()
                rows, pad = slice(start, start + len(bt)), t_max - k.shape[2]
                k_out[rows, :, :pad].zero_()  # left padding: finite, masked
                v_out[rows, :, :pad].zero_()
                k_out[rows, :, pad:] = k
                v_out[rows, :, pad:] = v
                start += len(bt)
        masks = []
        for bt in batches:
            pad = t_max + 1 - bt.attention_mask.shape[1]
            masks.append(torch.nn.functional.pad(bt.attention_mask, (pad, 0), value=0))
        return cls(
            rows=[r for bt in batches for r in bt.rows],
            input_ids=torch.cat([bt.input_ids for bt in batches]),
            position_ids=torch.cat([bt.position_ids for bt in batches]),
            attention_mask=torch.cat(masks),
            cache=cache,
        )

    def filter(self, keep_ids: set[str]) -> Batch | None:
        """Keep only the rows whose request id is in `keep_ids`; None when no row is left.

        Columns on the left that are padding for every kept row are trimmed from the cache and the mask.
        """
        idx = [i for i, r in enumerate(self.rows) if r.request_id in keep_ids]
        if not idx:
            return None
        if len(idx) == len(self.rows):
            return self
        index = torch.tensor(idx, dtype=torch.long, device=self.input_ids.device)
        mask = self.attention_mask.index_select(0, index)  # [B', T + 1]
        # Leading all-pad columns: the first column where any kept row has a real token.
        start = int(torch.nonzero(mask.any(dim=0))[0, 0])
        k_ref, _ = self.cache.slabs[0].valid()
        cache = SlabCache.allocate(num_layers=len(self.cache.slabs),
                                   shape=(len(idx), k_ref.shape[1], k_ref.shape[2] - start, k_ref.shape[3]),
                                   headroom=64, dtype=k_ref.dtype, device=k_ref.device)
        for old, new in zip(self.cache.slabs, cache.slabs, strict=True):
            k, v = old.valid()
            k_new, v_new = new.valid()
            torch.index_select(k[:, :, start:], 0, index, out=k_new)  # written in place: one copy
            torch.index_select(v[:, :, start:], 0, index, out=v_new)
        return Batch(
            rows=[self.rows[i] for i in idx],
            input_ids=self.input_ids.index_select(0, index),
            position_ids=self.position_ids.index_select(0, index),
            attention_mask=mask[:, start:],
            cache=cache,
        )
