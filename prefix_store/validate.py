"""Shared safetensors reading/writing and prefix checks for the native and the PEFT codec.

Uploads are untrusted. We parse and check the safetensors header ourselves (length, JSON, dtypes, shapes,
offsets) before any bytes reach the safetensors library, so every refusal is a `PrefixError` that says what
was expected and what was found. Nothing is ever unpickled.

safetensors layout: `u64 little-endian N | N bytes of JSON header | data`. The header maps tensor names to
`{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the data section) plus an optional
`"__metadata__"` dict of str -> str.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load

from prefix_store.types import ModelSpec, PrefixError

# Float dtypes accepted in files (safetensors code -> torch dtype). Anything else (ints, fp8...) is refused.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in FLOAT_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header (already checked against the buffer)."""

    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    begin: int  # offsets in the data section
    end: int


def check_size(nbytes: int, max_bytes: int, what: str) -> None:
    """Refuse inputs above `max_bytes` before looking inside them."""
    if nbytes > max_bytes:
        raise PrefixError(f"{what} is too large: {nbytes} bytes, the limit is {max_bytes} bytes")


def check_virtual_tokens(num_virtual_tokens: int, max_virtual_tokens: int) -> None:
    """P must be in 1..max_virtual_tokens."""
    if not 1 <= num_virtual_tokens <= max_virtual_tokens:
        raise PrefixError(
            f"num_virtual_tokens must be between 1 and {max_virtual_tokens}, found {num_virtual_tokens}"
        )


def parse_header(data: bytes, what: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and fully check a safetensors header; return (tensors by name, __metadata__).

    Checks: header length within the data, valid UTF-8 JSON object, well-formed entries, float dtypes only,
    offsets inside the buffer, sizes equal to prod(shape) * itemsize, and the data section covered exactly
    (contiguous, no overlap, no trailing bytes), which is what the safetensors library requires too.
    """
    if len(data) < 8:
        raise PrefixError(f"{what} is not a safetensors file: {len(data)} bytes, expected at least 8")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > _MAX_HEADER_BYTES:
        raise PrefixError(
            f"{what} is not a valid safetensors file: header length {n} exceeds the {len(data) - 8} bytes "
            "after the length field (truncated or forged header)"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PrefixError(
            f"{what} is not a valid safetensors file: header is not valid JSON ({exc})"
        ) from None
    if not isinstance(header, dict):
        raise PrefixError(f"{what}: safetensors header must be a JSON object, found {type(header).__name__}")
    raw_meta = header.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict) or not all(isinstance(v, str) for v in raw_meta.values()):
        raise PrefixError(f"{what}: safetensors __metadata__ must map strings to strings")
    data_len = len(data) - 8 - n
    tensors = {name: _tensor_info(what, name, entry, data_len) for name, entry in header.items()}
    pos = 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != pos:
            raise PrefixError(
                f"{what}: tensor {name!r} starts at data offset {info.begin}, expected {pos} "
                "(overlapping or non-contiguous tensors)"
            )
        pos = info.end
    if pos != data_len:
        raise PrefixError(f"{what}: tensors cover {pos} bytes of data, the file holds {data_len}")
    return tensors, dict(raw_meta)


def _tensor_info(what: str, name: str, entry: object, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise PrefixError(f"{what}: header entry {name!r} must be an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
        raise PrefixError(
            f"{what}: tensor {name!r} has dtype {dtype!r}, expected a float type ({', '.join(FLOAT_DTYPES)})"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise PrefixError(f"{what}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise PrefixError(f"{what}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise PrefixError(
            f"{what}: tensor {name!r} data_offsets [{begin}, {end}] lie outside the {data_len}-byte data"
        )
    expected = math.prod(shape) * FLOAT_DTYPES[dtype].itemsize
    if end - begin != expected:
        raise PrefixError(
            f"{what}: tensor {name!r} of shape {shape} {dtype} needs {expected} bytes, its offsets span "
            f"{end - begin}"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def require_names(tensors: dict[str, TensorInfo], expected: set[str], what: str) -> None:
    """The file must hold exactly the `expected` tensors."""
    missing, extra = expected - tensors.keys(), tensors.keys() - expected
    if missing or extra:
        raise PrefixError(
            f"{what}: expected tensors {sorted(expected)}, found {sorted(tensors)}"
            + (f"; missing {sorted(missing)}" if missing else "")
            + (f"; unexpected {sorted(extra)}" if extra else "")
        )


def load_checked(data: bytes) -> dict[str, torch.Tensor]:
    """Load tensors from bytes whose header `parse_header` has accepted (safetensors, no pickle)."""
    try:
        return st_load(data)
    except Exception as exc:  # the library's own checks: should not fire after parse_header
        raise PrefixError(f"safetensors could not read the file: {exc}") from None


def check_finite(name: str, t: torch.Tensor) -> None:
    """Refuse NaN/Inf anywhere in `t`."""
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise PrefixError(f"{name} holds {bad} NaN/Inf values, expected only finite values")


def check_kv(keys: torch.Tensor, values: torch.Tensor, spec: ModelSpec | None) -> None:
    """keys/values: [L, kv_heads, P, head_dim], same shape and float dtype; matching `spec` when given."""
    if keys.dim() != 4:
        raise PrefixError(f"keys must be 4-D [layers, kv_heads, P, head_dim], found shape {list(keys.shape)}")
    if keys.shape != values.shape:
        raise PrefixError(f"keys and values differ in shape: {list(keys.shape)} vs {list(values.shape)}")
    if keys.dtype != values.dtype or keys.dtype not in DTYPE_CODES:
        raise PrefixError(f"keys/values must share one float dtype, found {keys.dtype} and {values.dtype}")
    if spec is not None:
        expected = (spec.num_layers, spec.num_kv_heads, keys.shape[2], spec.head_dim)
        if tuple(keys.shape) != expected:
            raise PrefixError(
                f"prefix shape [layers, kv_heads, P, head_dim] = {list(keys.shape)} does not fit base model "
                f"{spec.model_id!r}: expected {list(expected)}"
            )


def dump_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialize tensors deterministically (sorted names, sorted metadata, 8-byte aligned header).

    The safetensors library may order metadata differently between processes; content hashes must not change.
    Assumes a little-endian host, as safetensors does.
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + b"".join(chunks)
