"""A zipped PEFT adapter directory, read and written safely (its two files' bytes; peft_codec.py decodes them).

Reading refuses what an upload could use against the server: unsafe member names (zip slip), encrypted members,
declared or actual uncompressed sizes above the limit (zip bombs), and archives holding several adapters. Writing
is deterministic (fixed timestamps and modes, sorted names): the same files always give the same zip.
"""

from __future__ import annotations

import io
import posixpath
import zipfile
import zlib
from typing import IO

from prefix_store.types import PrefixError
from prefix_store.validate import check_size

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same prefix always gives the same zip


def zip_files(files: dict[str, bytes], *, folder: str = "") -> bytes:
    """{name: bytes} as one deterministic zip (fixed timestamps and modes, sorted names)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(posixpath.join(folder, name) if folder else name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, files[name])
    return buf.getvalue()


def read_peft_zip(data: bytes, *, max_bytes: int) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) bytes of a zipped PEFT adapter directory, read with the
    checks this module's docstring lists; what they hold is not looked at here."""
    check_size(len(data), max_bytes, "PEFT zip")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            config_info, weights_info = _pick_members(zf.infolist())
            declared = config_info.file_size + weights_info.file_size
            if declared > max_bytes:
                raise PrefixError(
                    f"PEFT zip declares {declared} uncompressed bytes for the adapter files, "
                    f"the limit is {max_bytes} bytes"
                )
            with zf.open(config_info) as f:
                config_json = read_limited(f, max_bytes, config_info.filename)
            with zf.open(weights_info) as f:
                weights = read_limited(f, max_bytes - len(config_json), weights_info.filename)
    except PrefixError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as exc:
        raise PrefixError(f"PEFT zip could not be read: {exc}") from None
    return config_json, weights


def read_limited(stream: IO[bytes], limit: int, name: str) -> bytes:
    """Read a decompressing stream, stopping as soon as more than `limit` bytes come out."""
    chunks: list[bytes] = []
    total = 0
    while chunk := stream.read(1 << 16):
        total += len(chunk)
        if total > limit:
            raise PrefixError(f"PEFT zip member {name!r} decompresses to more than {limit} bytes (the limit)")
        chunks.append(chunk)
    return b"".join(chunks)


def _pick_members(infos: list[zipfile.ZipInfo]) -> tuple[zipfile.ZipInfo, zipfile.ZipInfo]:
    """Check every member name and flag; return (config, weights) from the one folder that holds both."""
    by_dir: dict[str, dict[str, zipfile.ZipInfo]] = {}
    for info in infos:
        _check_member_name(info.filename)
        if info.flag_bits & 0x1:
            raise PrefixError(
                f"PEFT zip member {info.filename!r} is encrypted; encrypted archives are refused"
            )
        if info.is_dir() or info.filename.startswith("__MACOSX/"):
            continue
        folder, base = posixpath.split(info.filename)
        by_dir.setdefault(folder, {})[base] = info
    complete = [d for d, files in by_dir.items() if {CONFIG_NAME, WEIGHTS_NAME} <= files.keys()]
    if len(complete) > 1:
        raise PrefixError(f"PEFT zip holds several adapters (folders {sorted(complete)}), expected one")
    if not complete:
        found = sorted(base for files in by_dir.values() for base in files)
        hint = " (adapter_model.bin is pickled and never loaded)" if "adapter_model.bin" in found else ""
        raise PrefixError(
            f"PEFT zip must hold {CONFIG_NAME} and {WEIGHTS_NAME} in one folder, found {found[:20]}{hint}"
        )
    files = by_dir[complete[0]]
    return files[CONFIG_NAME], files[WEIGHTS_NAME]


def _check_member_name(name: str) -> None:
    """Refuse absolute paths, drive letters, backslashes, NUL and `..` parts (zip slip)."""
    parts = name.split("/")
    if (
        name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or (len(name) > 1 and name[1] == ":")
        or ".." in parts
    ):
        raise PrefixError(f"PEFT zip member name {name!r} is unsafe (absolute or escaping the archive)")
