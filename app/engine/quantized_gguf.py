"""A GGUF file's own 4-bit weights (Q4_0, Q4_1 blocks) as int4 rows for the CPU kernels (app/engine/quantized.py).

transformers dequantizes a GGUF to float weights when it loads one (app/engine/gguf_cache.py); this module reads the
same file with the `gguf` package and keeps the blocks quantized instead. Names: the `gguf` package's own map from
HF module names to GGUF tensor names (`blk.3.attn_q` for `model.layers.3.self_attn.q_proj`). llama.cpp's converter
permutes the rows of the query and key projections of "llama" files for its RoPE layout; transformers undoes that
when it loads them, and so do we, on whole rows (a row's blocks move with it).

Every weight read here is checked against the float weight the model loaded from the same file (its dequantized
values, which must be equal): a name or a permutation gone wrong stops the load instead of serving other weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from app.engine.quantized import GROUP, Int4Rows

log = logging.getLogger(__name__)

_Q4 = {gguf.GGMLQuantizationType.Q4_0: 18, gguf.GGMLQuantizationType.Q4_1: 20}  # bytes per block of 32


class GgufMismatch(ValueError):
    """A GGUF tensor does not hold the weights the model loaded from it."""


def _unpack_blocks(raw: np.ndarray, qtype: gguf.GGMLQuantizationType, n: int, k: int) -> Int4Rows:
    """raw [N, K / 32 * block bytes] uint8 -> Int4Rows. Block layout (ggml): fp16 d, (Q4_1: fp16 m,) 16 bytes of
    nibbles, byte j holding value j (low nibble) and value j + 16 (high nibble)."""
    blocks = torch.from_numpy(np.array(raw, dtype=np.uint8)).reshape(n, k // GROUP, _Q4[qtype])
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()  # [N, K / 32]
    if qtype == gguf.GGMLQuantizationType.Q4_1:
        m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
        zero = m + 8 * d  # d * q + m = (q - 8) * d + (m + 8 d)
    else:
        zero = torch.zeros_like(d)  # d * (q - 8)
    nibbles = blocks[..., -GROUP // 2 :]
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1)  # [N, K / 32, 32]
    return Int4Rows(q.reshape(n, k), d, zero)


def _rope_row_order(rows: int, heads: int) -> torch.Tensor:
    """Index of the GGUF row that holds each HF row of a "llama" file's q/k projection (transformers'
    `LlamaTensorProcessor._reverse_permute_weights`, applied to row numbers)."""
    dim = rows // heads // 2
    return torch.arange(rows).reshape(heads, dim, 2).transpose(1, 2).reshape(rows)


class GgufInt4:
    """The Q4_0/Q4_1 tensors of one GGUF file, looked up by HF module name."""

    def __init__(self, path: Path, config: Any) -> None:
        self.reader = gguf.GGUFReader(str(path))
        arch_field = self.reader.fields["general.architecture"]
        self.arch = str(arch_field.contents())
        arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.arch), None)
        if arch is None:
            raise GgufMismatch(f"unknown GGUF architecture {self.arch!r}")
        layers = int(config.num_hidden_layers)
        self.names = gguf.get_tensor_name_map(arch, layers)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)

    def rows(self, module_name: str, weight: torch.Tensor) -> Int4Rows | None:
        """The int4 rows of the linear `module_name` (weight [N, K] as loaded), or None when the file holds it in
        another type (or not at all, e.g. a tied output projection)."""
        base = self.names.get_name(module_name)
        tensor = self.tensors.get(f"{base}.weight") if base is not None else None
        if tensor is None or tensor.tensor_type not in _Q4:
            return None
        n, k = weight.shape
        rows = _unpack_blocks(tensor.data, tensor.tensor_type, n, k)
        if self.arch == "llama" and base is not None and base.endswith((".attn_q", ".attn_k")):
            heads = self.heads if base.endswith(".attn_q") else self.kv_heads
            order = _rope_row_order(n, heads)
            rows = Int4Rows(rows.q[order], rows.scale[order], rows.zero[order])
        self._check(module_name, rows, weight)
        return rows

    @staticmethod
    def _check(module_name: str, rows: Int4Rows, weight: torch.Tensor) -> None:
        """The blocks must dequantize to the loaded weights, up to the rounding of the model's dtype (bf16 models)."""
        got = rows.dequantize()
        want = weight.detach().float()
        tol = torch.finfo(weight.dtype).eps * got.abs() + 1e-6 * float(got.abs().max())
        excess = (got - want).abs() - tol
        if bool((excess > 0).any()):
            err = float((got - want).abs().max())
            raise GgufMismatch(f"{module_name}: the GGUF blocks dequantize to other weights than the model's "
                               f"(max |difference| {err:.3g}, expected within the {weight.dtype} rounding)")
