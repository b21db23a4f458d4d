"""Weight-only quantized linear weights for CPU serving, multiplied by PyTorch's own CPU kernels.

Two forms, each a frozen copy of one linear layer's weight W [N, K] (N out, K in features):
- int4, groupwise along K in groups of 32, one scale and one zero per group and output channel:
  W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n], g = k // 32, q in 0..15
  (`aten._weight_int4pack_mm_for_cpu`; convention checked against a dequantized reference in the tests).
  GGUF's Q4_1 blocks (32 values, w = d * q + m) are exactly this with scale = d, zero = m + 8 d, and Q4_0 blocks
  (w = d * (q - 8)) with zero = 0, so a GGUF's 4-bit weights are served as they are (app/engine/quantized_gguf.py);
- int8, one scale per output channel: W[n, k] = q[n, k] * scale[n] (`aten._weight_int8pack_mm`).

Both kernels take bf16 activations on the CPU: their fp32 and fp16 paths are scalar loops (measured ~100x slower
for a decode step's shapes), so a quantized linear rounds its input to bf16 and returns bf16. Both
give a row the same bits whatever the other rows of the matmul are (checked for 1..50 rows), which the engine's
batch invariance needs.

Rows of several weights with the same K can be fused into one matmul before packing (`Int4Rows.cat`): q, k and v,
or gate and up, then cost one kernel call instead of three or two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from app.engine.quantized_layers import KINDS, linear

GROUP = 32  # GGUF's block size for Q4_0/Q4_1, and one of the group sizes the int4 kernel takes
COMPUTE_DTYPE = torch.bfloat16
_INNER_K_TILES = 2  # the packing's K-tile count; the CPU packing accepts it for the CUDA op's signature


@dataclass(frozen=True)
class Int4Rows:
    """Unpacked int4 weight: q [N, K] uint8 in 0..15; scale, zero [N, K / 32] float32."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @staticmethod
    def cat(parts: Sequence[Int4Rows]) -> Int4Rows:
        """The rows of `parts` stacked along N (one matmul for several weights of the same K)."""
        return Int4Rows(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                        torch.cat([p.zero for p in parts]))

    def dequantize(self) -> torch.Tensor:
        """W [N, K] float32, as the kernel's convention defines it."""
        n, k = self.q.shape
        q = self.q.float().reshape(n, k // GROUP, GROUP)
        w: torch.Tensor = (q - 8) * self.scale[..., None] + self.zero[..., None]
        return w.reshape(n, k)


@dataclass(frozen=True)
class Int8Rows:
    """Unpacked int8 weight: q [N, K] int8; scale [N] float32."""

    q: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def cat(parts: Sequence[Int8Rows]) -> Int8Rows:
        return Int8Rows(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))

    def dequantize(self) -> torch.Tensor:
        """W [N, K] float32."""
        return self.q.float() * self.scale[:, None]


def int4_rows_rtn(weight: torch.Tensor) -> Int4Rows:
    """Round-to-nearest asymmetric int4 of W [N, K] (K a multiple of 32), groups of 32 along K.

    A group's minimum maps to q = 0 and its maximum to q = 15 (llama.cpp's Q4_1 recipe).
    """
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"int4 needs in_features divisible by {GROUP}; got {k}")
    w = weight.detach().float().reshape(n, k // GROUP, GROUP)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [N, K / 32]
    scale = (hi - lo) / 15
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round((w - lo[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
    return Int4Rows(q.reshape(n, k), scale, lo + 8 * scale)


def int8_rows_rtn(weight: torch.Tensor) -> Int8Rows:
    """Round-to-nearest symmetric int8 of W [N, K], one scale per output channel (the row's max |w| -> 127)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127  # [N]
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round(w * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Rows(q, scale)


class QuantizedLinear:
    """A packed quantized weight (and optional bias) that multiplies like `F.linear`: x [..., K] -> [..., N].

    Not an `nn.Module`: it is a serving copy held beside the model, never one of its parameters.
    """

    def __init__(self, rows: Int4Rows | Int8Rows, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = rows.q.shape
        self.kind = "int4" if isinstance(rows, Int4Rows) else "int8"
        if isinstance(rows, Int4Rows):
            self.data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows.q.to(torch.int32), _INNER_K_TILES)
            # [K / 32, N, 2]: (scale, zero) per group and output channel, in the activations' dtype
            self.scales = torch.stack([rows.scale.t(), rows.zero.t()], dim=-1).to(COMPUTE_DTYPE).contiguous()
        else:
            self.data = rows.q.contiguous()
            self.scales = rows.scale.to(COMPUTE_DTYPE)
        self._kind_id = KINDS[self.kind]
        self.bias = None if bias is None else bias.detach().clone()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (any float dtype; rounded to bf16) -> [M, N] in bf16, the kernels' output (float32 with a bias).

        Two-dimensional and bf16 out on purpose: at one row a decode step is ~120 quantized matmuls, and a reshape or
        a conversion around each costs as much as a kernel; callers let type promotion widen the result inside
        the operator that consumes it (a residual add, RoPE) instead.
        """
        return linear(x, self.data, self.scales, self.bias, self._kind_id)

    @property
    def nbytes(self) -> int:
        return int(self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size())


def kernels_available() -> bool:
    """Whether this torch build has the CPU weight-only kernels."""
    ops = torch.ops.aten
    return all(hasattr(ops, name) for name in (
        "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu", "_weight_int8pack_mm"))
