"""oneDNN-prepacked linear layers for CPU inference of the frozen base model.

PyTorch's CPU `nn.Linear` calls MKL's sgemm on the plain weight every step. oneDNN's matmul (brgemm, AVX-512
where the CPU has it) on a weight reordered once into its blocked layout is much faster for the small row counts
of decode steps. Measured on this project's 2-vCPU AMD EPYC VM (AVX-512), the linears of one
SmolLM2-135M decode step (fp32): 80 ms -> 48 ms at 32 rows, 23 ms -> 17 ms at 1 row; the whole 32-row decode
forward 126 ms -> 85 ms (bench/RESULTS.md).

`pack_linears(model)` turns every CPU fp32 `nn.Linear` of the model into a `PackedLinear` in place (a class
swap: parameters, tied weights, hooks and state-dict keys stay exactly as they are) and keeps a packed copy of its
weight. The packed path runs only where no gradient is recorded (the engine runs under `inference_mode`); a
forward with gradients (training a prefix through the shared frozen model) takes the ordinary `F.linear`, so
training and serving share one model object. Costs one more copy of the linear weights in memory.

The base model is frozen: weights changed in place after packing (`load_state_dict`) would leave the packed copy
stale, so pack after the weights are final. A packed model cannot be pickled (oneDNN's opaque tensor); a deep copy
is an ordinary model.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class PackedLinear(torch.nn.Linear):
    """An `nn.Linear` whose gradient-free forward uses a oneDNN-packed copy of its (frozen) weight."""

    packed_weight: torch.Tensor  # opaque oneDNN tensor, same [out_features, in_features] as `weight`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]."""
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> torch.nn.Linear:
        """A copy is an ordinary `nn.Linear` (oneDNN's opaque tensor cannot be copied; a copy of the model is
        usually made to be changed, e.g. wrapped by PEFT). Parameters go through `memo`, so tied weights stay tied."""
        clone = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        clone.weight = copy.deepcopy(self.weight, memo)
        clone.bias = copy.deepcopy(self.bias, memo)
        clone.train(self.training)
        return clone


def packing_available() -> bool:
    """Whether this torch build has oneDNN (mkldnn) and its packed-linear operators."""
    available = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    return bool(available) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_linears(model: torch.nn.Module, *, batch_hint: int = 32) -> int:
    """Pack every frozen CPU fp32 `nn.Linear` of `model` in place; returns how many were packed.

    `batch_hint` is the row count oneDNN picks its blocking for (any count works; measured: hints of 32, 64 and
    256 give the same speed for 1-64 rows, a hint of 1 is ~20% slower at 16-64 rows). Modules already packed,
    on another device, in another dtype, or with trainable weights are left as they are. A torch build without
    oneDNN packs nothing.
    """
    if not packing_available():
        log.info("oneDNN is not available in this torch build: linear layers stay unpacked")
        return 0
    packed = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            continue
        w = module.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or w.requires_grad:
            continue
        packed_weight = torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch_hint)
        module.__class__ = PackedLinear
        module.packed_weight = packed_weight
        packed += 1
    return packed
