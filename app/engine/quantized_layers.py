"""The decoder layers of the quantized serving forward as one TorchScript function.

At one row a forward calls ATen 1,353 times from Python (torch.profiler, embedded model), each a few µs of argument
parsing and dispatch around a kernel that is often no longer. Run by TorchScript's interpreter, the same operators
in the same order cost less: measured on the embedded model, a one-row decode step 10.1-12.7 ms -> 8.5-9.6 ms, 8
rows 3-6% less, 32 rows within noise (interleaved A/B runs, bench/RESULTS.md). The interpreter calls the very ATen
kernels the Python loop calls (it fuses nothing on a CPU unless asked to), so its logits are bitwise those of
running this function as plain Python (tested): scripting changes the speed, never the tokens. `torch.compile` was
measured too and is not used: minutes of compilation, and its own kernels round differently from eager.

`torch.jit.script` is deprecated in PyTorch (still shipped and working in 2.x); should it fail or go away,
`layer_loop` returns this same function uncompiled and the forward runs it as Python, equal and ~15% slower at
one row. Scripting takes ~12 ms (measured; later calls in the same process reuse the compiled function).

Weights travel as plain tensors, 10 per layer, so that one compiled function serves every layer; a linear is int4
(`aten._weight_int4pack_mm_for_cpu`), int8 (`aten._weight_int8pack_mm`) or, for the tests' reference only, float
(`F.linear`), one kind for all layers. `linear` is also what `QuantizedLinear` (the output projection) calls: one
implementation of a quantized matmul.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import List, Optional  # noqa: UP035  # TorchScript reads these annotations, not builtin generics

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

KIND_INT4, KIND_INT8, KIND_FLOAT = 4, 8, 32
KINDS = {"int4": KIND_INT4, "int8": KIND_INT8, "float": KIND_FLOAT}  # QuantizedLinear.kind -> the id passed in


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045
           kind: int) -> torch.Tensor:
    """x [M, K] (any float dtype; rounded to bf16 for the quantized kernels) -> [M, N]: bf16, or float32 with a bias.
    weight, scales: `QuantizedLinear.data` / `.scales`."""
    # literals: TorchScript cannot read module-level ints (KIND_INT4 = 4, KIND_INT8 = 8, app/engine/quantized.py's
    # GROUP = 32)
    if kind == 4:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), weight, 32, scales)
    elif kind == 8:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), weight, scales)
    else:
        y = F.linear(x.to(weight.dtype), weight)
    out: torch.Tensor = y if bias is None else y + bias
    return out


def decoder_layers(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                   keys: List[torch.Tensor], values: List[torch.Tensor], start: int,  # noqa: UP006
                   layers: List[List[torch.Tensor]], biases: List[List[Optional[torch.Tensor]]],  # noqa: UP006, UP045
                   norm_floor: torch.Tensor, kind: int, rows: int, q_len: int, heads: int, kv_heads: int,
                   head_dim: int, scaling: float) -> torch.Tensor:
    """Every decoder layer over the residual stream h [N, H] float32 (N = rows * q_len) -> h [N, H].

    cos, sin [N, 1, D] in the cache's dtype (sin with rotate_half's sign folded in); mask [B, 1, Q, T + Q]
    additive; keys/values: each layer's whole slabs [B, H_kv, capacity, D], the Q new tokens written at columns
    start .. start + Q - 1 (room reserved by the caller); layers: per layer, in this order, the two RMSNorm weights
    (already times sqrt(H)), then data and scales of the fused q/k/v, o, fused gate/up and down linears; biases:
    q/k/v, o, gate/up, down per layer (None: no bias). The operators are QuantizedDecoder's documented ones, in its
    order.
    """
    n, half, qk_heads, end = rows * q_len, head_dim // 2, heads + kv_heads, start + q_len
    gqa = heads != kv_heads
    for i in range(len(layers)):
        w, b = layers[i], biases[i]
        x = (h * w[0]).div_(torch.hypot(torch.linalg.vector_norm(h, 2.0, [-1], True), norm_floor))
        qkv = linear(x, w[2], w[3], b[0], kind).view(n, qk_heads + kv_heads, head_dim)
        qk = qkv[:, :qk_heads]
        qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)  # RoPE, q and k at once, [N, Hq + Hkv, D]
        k_slab, v_slab = keys[i], values[i]
        k_slab[:, :, start:end] = qk[:, heads:].view(rows, q_len, kv_heads, head_dim).transpose(1, 2)
        v_slab[:, :, start:end] = qkv[:, qk_heads:].view(rows, q_len, kv_heads, head_dim).transpose(1, 2)
        query = qk[:, :heads].view(rows, q_len, heads, head_dim).transpose(1, 2)  # [B, Hq, Q, D]
        attn = F.scaled_dot_product_attention(query, k_slab[:, :, :end], v_slab[:, :, :end], attn_mask=mask,
                                              scale=scaling, enable_gqa=gqa)  # [B, Hq, Q, D]
        h = h + linear(attn.transpose(1, 2).reshape(n, heads * head_dim), w[4], w[5], b[1], kind)
        x = (h * w[1]).div_(torch.hypot(torch.linalg.vector_norm(h, 2.0, [-1], True), norm_floor))
        gate, up = linear(x, w[6], w[7], b[2], kind).chunk(2, -1)
        h = h + linear(F.silu(gate) * up, w[8], w[9], b[3], kind)
    return h


LayerLoop = Callable[..., torch.Tensor]


def layer_loop(scripted: bool = True) -> LayerLoop:
    """`decoder_layers`, compiled by TorchScript when `scripted` and this torch can; else as Python."""
    if not scripted:
        return decoder_layers
    try:
        with warnings.catch_warnings():  # its deprecation notice, once per process: the module docstring says why
            warnings.simplefilter("ignore", DeprecationWarning)
            fn: LayerLoop = torch.jit.script(decoder_layers)
    except Exception as exc:  # any failure to compile leaves the same function, run as Python
        log.warning("TorchScript unavailable for the quantized layers (%s); running them as Python", exc)
        return decoder_layers
    return fn
