"""The serving forward of a Llama-family model on quantized weights (CPU): fewer ops per layer than transformers'.

transformers' Llama forward calls three q/k/v projections and two MLP input projections apart, RoPE on q and k
apart, RMSNorm as seven operators, a causal-mask builder per forward, through several Python call layers per
decoder layer. Once 4-bit weights make the matmuls cheap, that is a large share of a one-row decode step. This
forward runs the same computation with the model's own norms, embeddings and rotary module and a quantized serving
copy of its linear layers (app/engine/quantized.py): q/k/v fused into one matmul, gate/up into one, RoPE on q and
k in one pass, RMSNorm in four operators, the additive mask built once per forward, and no dtype conversion that
only hands a tensor on (see `forward`). Measured on the embedded model at one row (bench/RESULTS.md): outside
matmuls and attention, transformers' forward spends ~5.3 ms per step; this one's first version ~2.5 ms, and the
conversions and RMSNorm taken out after that cut a whole step by another ~2 ms (13.1 -> 11.1 ms, AVX2 EPYC). The
layers themselves run as one TorchScript function (app/engine/quantized_layers.py): the same operators, bitwise
the same logits, less per-operator overhead.

It never touches the model: no module is swapped or wrapped, so training (which shares the model object) sees the
float weights and transformers' forward. The KV cache, masks and positions are the batch's (app/engine/batch.py):
row i attends to the columns its `attention_mask` marks, and to earlier positions of its own prompt.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from app.engine.kv import SlabCache
from app.engine.quantized import (
    Int4Rows,
    Int8Rows,
    QuantizedLinear,
    int4_rows_rtn,
    int8_rows_rtn,
    kernels_available,
)
from app.engine.quantized_gguf import GgufInt4
from app.engine.quantized_layers import KINDS, LayerLoop, layer_loop
from app.engine.soft_inputs import SoftInputs

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# The KV cache and attention run in float64, so a row's tokens do not depend on its batch. Attention over a
# longer, left-padded cache (a row in a batch) sums in another order than over the row's own (alone): in float32
# that is a last-bit difference, and the bf16 rounding of the next quantized linear's input turns a last-bit
# difference into a bf16 step often enough to flip greedy tokens (measured: 2 of 16 held-out rows within 32
# tokens, logits never bitwise equal). In float64 the order's difference stays below what the rounding to bf16 can
# see: logits bitwise equal alone and batched (16 of 16). Costs ~5% of a 32-row decode step, twice the cache bytes.
KV_DTYPE = torch.float64
WEIGHT_MODES = ("int4", "int8")


class UnsupportedModel(ValueError):
    """The model cannot be served by the quantized forward (architecture, device or dtype)."""


class RmsNorm:
    """RMSNorm in four operators: x * w / sqrt(mean(x^2) + eps) = x * (w sqrt(H)) / hypot(|x|, sqrt(H eps)).

    The same function as transformers' (float32 in and out, equal within float32 rounding), at 5.8 us a call
    instead of `F.rms_norm`'s 13.7 us on a [1, 576] row (on the CPU it runs as a chain of small operators,
    power, mean, add, rsqrt, multiplies and copies): a decode step has 61.
    """

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        h = weight.shape[-1]
        self.weight = weight.detach().float() * h**0.5  # [H]
        self.floor = torch.tensor(h * eps) ** 0.5  # 0-d

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H] float32; each row's result depends on that row alone."""
        norm = torch.hypot(torch.linalg.vector_norm(x, 2, -1, keepdim=True), self.floor)  # sqrt(|x|^2 + H eps)
        out: torch.Tensor = (x * self.weight).div_(norm)
        return out


@dataclass(frozen=True)
class _Layer:
    ln1: RmsNorm
    ln2: RmsNorm
    qkv: QuantizedLinear  # H -> (Hq + 2 Hkv) * D
    o: QuantizedLinear  # Hq * D -> H
    gate_up: QuantizedLinear  # H -> 2 I
    down: QuantizedLinear  # I -> H


def check_supported(model: Any) -> None:
    """Raise UnsupportedModel unless the model is a Llama-family decoder this forward computes exactly as
    transformers does (plain RoPE attention over the whole context, SiLU MLP, fp32/bf16 weights on the CPU)."""
    cfg = model.config
    problems = []
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model type {cfg.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg.hidden_act!r} (supported: silu)")
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True):
        problems.append(f"sliding-window attention ({window})")
    if (getattr(cfg, "pretraining_tp", 1) or 1) != 1:
        problems.append("pretraining_tp != 1")
    weight = model.get_input_embeddings().weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        problems.append(f"weights on {weight.device.type} in {weight.dtype} (supported: cpu, float32/bfloat16)")
    if problems:
        raise UnsupportedModel("quantized serving does not support " + "; ".join(problems))


class QuantizedDecoder:
    """`forward(batch) -> logits [B, V]` over a quantized serving copy of a Llama-family model's linears.

    mode "int4": linears as int4 (a GGUF's Q4_0/Q4_1 blocks when `gguf` has them, else round-to-nearest groups of
    32), the output projection as int8 per channel; mode "int8": every linear int8 per channel. The batch's KV
    cache must be in `KV_DTYPE`. `scripted`: the layers compiled by TorchScript (False: the same function as Python,
    bitwise equal and slower; for profiling what each operator costs).
    """

    def __init__(self, model: Any, mode: str, gguf: GgufInt4 | None = None, *, scripted: bool = True) -> None:
        if mode not in WEIGHT_MODES:
            raise ValueError(f"weights mode must be one of {WEIGHT_MODES}; got {mode!r}")
        check_supported(model)
        cfg = model.config
        self.mode = mode
        self.model = model
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.hidden = int(cfg.hidden_size)
        self.eps = float(cfg.rms_norm_eps)
        self.scaling = self.head_dim**-0.5
        # rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * [-1 (first half), +1 (second half)]
        self._rope_sign = torch.cat([-torch.ones(self.head_dim // 2), torch.ones(self.head_dim - self.head_dim // 2)]
                                    ).to(KV_DTYPE)
        inner = model.model
        self.embed = inner.embed_tokens.weight  # [V, H]
        self.rotary = inner.rotary_emb
        self.final_norm = RmsNorm(inner.norm.weight, self.eps)
        self._gguf = gguf
        self.from_gguf = 0  # linears whose int4 rows came from the GGUF file as they are
        self.lm_head = QuantizedLinear(int8_rows_rtn(model.lm_head.weight), model.lm_head.bias)
        self.set_layers([self._layer(i, layer) for i, layer in enumerate(inner.layers)])
        self._gguf = None  # the reader holds the file's metadata; not needed after loading
        self._loop: LayerLoop = layer_loop(scripted)

    def set_layers(self, layers: list[_Layer]) -> None:
        """Serve these layers (one kind of linear throughout); the tests swap in dequantized stand-ins."""
        kinds = {q.kind for layer in layers for q in (layer.qkv, layer.o, layer.gate_up, layer.down)}
        if len(kinds) != 1:
            raise ValueError(f"one kind of linear for every layer expected; got {sorted(kinds)}")
        self.layers = layers
        self._kind = KINDS[kinds.pop()]  # "float": the tests' stand-ins
        linears = [(layer.qkv, layer.o, layer.gate_up, layer.down) for layer in layers]
        self._tensors = [[layer.ln1.weight, layer.ln2.weight, *(t for q in qs for t in (q.data, q.scales))]
                         for layer, qs in zip(layers, linears, strict=True)]
        self._biases = [[q.bias for q in qs] for qs in linears]

    def _rows(self, name: str, linear: torch.nn.Linear) -> Int4Rows | Int8Rows:
        if self.mode == "int8":
            return int8_rows_rtn(linear.weight)
        rows = self._gguf.rows(name, linear.weight) if self._gguf is not None else None
        if rows is not None:
            self.from_gguf += 1
            return rows
        return int4_rows_rtn(linear.weight)

    def _fused(self, prefix: str, modules: dict[str, torch.nn.Linear]) -> QuantizedLinear:
        parts = [self._rows(f"{prefix}.{name}", lin) for name, lin in modules.items()]
        int4 = [p for p in parts if isinstance(p, Int4Rows)]
        int8 = [p for p in parts if isinstance(p, Int8Rows)]
        rows = Int4Rows.cat(int4) if len(int4) == len(parts) else Int8Rows.cat(int8)
        biases = [lin.bias for lin in modules.values()]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() if b is not None else lin.weight.new_zeros(lin.out_features)
                              for b, lin in zip(biases, modules.values(), strict=True)])
        return QuantizedLinear(rows, bias)

    def _layer(self, i: int, layer: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        pre = f"model.layers.{i}"
        return _Layer(
            ln1=RmsNorm(layer.input_layernorm.weight, self.eps),
            ln2=RmsNorm(layer.post_attention_layernorm.weight, self.eps),
            qkv=self._fused(f"{pre}.self_attn", {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj}),
            o=self._fused(f"{pre}.self_attn", {"o_proj": attn.o_proj}),
            gate_up=self._fused(f"{pre}.mlp", {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj}),
            down=self._fused(f"{pre}.mlp", {"down_proj": mlp.down_proj}),
        )

    @property
    def scripted(self) -> bool:
        """Whether the layers run compiled by TorchScript (else as Python)."""
        return isinstance(self._loop, torch.jit.ScriptFunction)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized serving copy (the norms and embeddings are the model's own)."""
        linears = [q for layer in self.layers for q in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        return sum(q.nbytes for q in linears) + self.lm_head.nbytes

    def describe(self) -> str:
        """One line for the log: what the serving copy holds, and how its layers run."""
        kinds = f"int4 ({self.from_gguf} linears from the GGUF's blocks as they are) + int8 output projection"
        return ((kinds if self.mode == "int4" else "int8 per channel") + f", {self.nbytes / 2**20:.0f} MiB, layers "
                + ("scripted by TorchScript" if self.scripted else "run as Python"))

    def _mask(self, attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
        """[B, T + Q] 0/1 -> additive [B, 1, Q, T + Q] in the cache's dtype (0 or -inf): a query sees the columns
        marked 1 up to its own position. Additive once per forward, because attention turns a boolean mask into
        this on every layer's call otherwise (the same values, 30 times).

        A padding query (prefill of a shorter prompt) also sees itself: a row with nothing to attend to would
        come out NaN and write NaN keys/values into the cache, which masked columns must never hold.
        """
        seen = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T + Q]
        if q_len > 1:
            total = attention_mask.shape[1]
            col = torch.arange(total, device=attention_mask.device)
            row = torch.arange(total - q_len, total, device=attention_mask.device)[:, None]  # [Q, 1]
            seen = (seen & (col <= row)) | (col == row)
        return torch.zeros(seen.shape, dtype=KV_DTYPE, device=seen.device).masked_fill_(~seen, float("-inf"))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache: SlabCache, soft: SoftInputs | None = None) -> torch.Tensor:
        """input_ids, position_ids [B, Q]; attention_mask [B, T + Q]; appends Q tokens to `cache`; -> logits [B, V]
        of every row's last position. `soft`: soft prompts' embeddings replacing some columns' (a prefill).

        Dtypes, chosen so that no layer converts a tensor only to hand it on: the residual stream h is float32; a
        quantized linear takes and returns bf16 and its result is widened inside the add that consumes it; RoPE
        runs in the cache's float64 (bf16 q/k times float64 cos/sin), so keys and queries reach attention in the
        cache's dtype without a copy; the MLP's SiLU and product stay in bf16, the down projection's input dtype.
        """
        b, q_len = input_ids.shape
        n, hq, hkv, d = b * q_len, self.heads, self.kv_heads, self.head_dim
        h = F.embedding(input_ids, self.embed)  # [B, Q, H]
        if soft is not None:
            h = soft.apply(h)
        cos, sin = self.rotary(h, position_ids)  # [B, Q, D] float32
        cos = cos.to(KV_DTYPE).view(n, 1, d)
        sin = (sin.to(KV_DTYPE) * self._rope_sign).view(n, 1, d)  # sign folded in: rotate_half is then a roll
        h = h.view(n, self.hidden)  # [N, H], N = B * Q: every linear is a 2-D matmul, no reshapes around it
        mask = self._mask(attention_mask, q_len)
        start = cache.length
        keys, values = cache.reserve(q_len)
        # every RMSNorm of the model has the final norm's floor (the same H and eps)
        h = self._loop(h, cos, sin, mask, keys, values, start, self._tensors, self._biases, self.final_norm.floor,
                       self._kind, b, q_len, hq, hkv, d, self.scaling)  # app/engine/quantized_layers.py
        cache.advance(q_len)
        last = self.final_norm(h.view(b, q_len, self.hidden)[:, -1])  # [B, H]
        logits: torch.Tensor = self.lm_head(last).float()
        return logits


def build_quantized(model: Any, mode: str, gguf_path: Path | None, *, scripted: bool = True) -> QuantizedDecoder:
    """The quantized serving forward of `model`; int4 reads the 4-bit blocks of `gguf_path` when given (the file the
    model was loaded from); `scripted`: its layers compiled by TorchScript (app/engine/quantized_layers.py). Raises
    UnsupportedModel for a model or device it cannot serve."""
    check_supported(model)
    if not kernels_available():
        raise UnsupportedModel("this torch build has no CPU weight-only int4/int8 kernels")
    started = time.perf_counter()
    gguf = GgufInt4(gguf_path, model.config) if mode == "int4" and gguf_path is not None else None
    decoder = QuantizedDecoder(model, mode, gguf, scripted=scripted)
    log.info("quantized serving copy built in %.1f s: %s", time.perf_counter() - started, decoder.describe())
    return decoder
