"""Reading and writing a zipped PEFT adapter directory: the refusals an upload could need, and determinism."""

from __future__ import annotations

import io
import struct
import zipfile

import pytest

from prefix_store.peft_zip import CONFIG_NAME, WEIGHTS_NAME, read_limited, read_peft_zip, zip_files
from prefix_store.types import PrefixError
from tests.prefix_store.conftest import zip_of

MAX_BYTES = 1 << 20
GOOD = {CONFIG_NAME: b'{"peft_type": "PREFIX_TUNING"}', WEIGHTS_NAME: b"weights" * 100}


def read(data: bytes, max_bytes: int = MAX_BYTES) -> tuple[bytes, bytes]:
    return read_peft_zip(data, max_bytes=max_bytes)


def _patch_central(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Overwrite a field of every central-directory entry (offset from the PK\\x01\\x02 signature)."""
    out = bytearray(data)
    pos = out.find(b"PK\x01\x02")
    while pos >= 0:
        struct.pack_into(fmt, out, pos + offset, value)
        pos = out.find(b"PK\x01\x02", pos + 4)
    return bytes(out)


def test_reads_the_two_files_at_the_root_or_in_one_folder() -> None:
    assert read(zip_of(GOOD)) == (GOOD[CONFIG_NAME], GOOD[WEIGHTS_NAME])
    nested = {f"my-adapter/{name}": content for name, content in GOOD.items()}
    assert read(zip_of(nested)) == (GOOD[CONFIG_NAME], GOOD[WEIGHTS_NAME])
    # Extra files (README.md, macOS junk) are ignored, never read.
    extra = {**GOOD, "README.md": b"# hi", "__MACOSX/._adapter_config.json": b"junk"}
    assert read(zip_of(extra)) == (GOOD[CONFIG_NAME], GOOD[WEIGHTS_NAME])


def test_written_zips_are_deterministic_and_read_back() -> None:
    one = zip_files(GOOD, folder="out")
    two = zip_files(dict(reversed(list(GOOD.items()))), folder="out")
    assert one == two
    with zipfile.ZipFile(io.BytesIO(one)) as zf:
        assert zf.namelist() == sorted(f"out/{name}" for name in GOOD)
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert read(one) == (GOOD[CONFIG_NAME], GOOD[WEIGHTS_NAME])


@pytest.mark.parametrize("bad_name", ["../evil.txt", "/etc/passwd", "a/../../b", "C:/x", "a\\..\\b"])
def test_zip_slip_refused(bad_name: str) -> None:
    with pytest.raises(PrefixError, match="is unsafe"):
        read(zip_of({**GOOD, bad_name: b"x"}))


def test_zip_bomb_declared_size() -> None:
    forged = _patch_central(zip_of(GOOD), 24, "<I", 0xFFFFFFF0)  # uncompressed size field
    with pytest.raises(PrefixError, match=r"declares .* uncompressed bytes"):
        read(forged)


def test_zip_bomb_real() -> None:
    data = zip_of({**GOOD, WEIGHTS_NAME: b"\0" * (4 << 20)})  # 4 MiB of zeros deflates to ~4 KiB
    assert len(data) < 64 * 1024
    with pytest.raises(PrefixError, match="declares"):
        read(data)


def test_read_limited_counts_actual_bytes() -> None:
    assert read_limited(io.BytesIO(b"a" * 100), 100, "m") == b"a" * 100
    with pytest.raises(PrefixError, match="decompresses to more than 99 bytes"):
        read_limited(io.BytesIO(b"a" * 100), 99, "m")


def test_zip_understated_size_fails_cleanly() -> None:
    forged = _patch_central(zip_of(GOOD), 24, "<I", 10)  # zipfile stops at the declared size, then the CRC fails
    with pytest.raises(PrefixError, match="could not be read"):
        read(forged)


def test_zip_encrypted_refused() -> None:
    forged = _patch_central(zip_of(GOOD), 8, "<H", 0x1)  # general purpose flag bit 0
    with pytest.raises(PrefixError, match="is encrypted"):
        read(forged)


def test_zip_member_problems() -> None:
    with pytest.raises(PrefixError, match=r"must hold adapter_config.json and adapter_model.safetensors"):
        read(zip_of({CONFIG_NAME: GOOD[CONFIG_NAME]}))
    with pytest.raises(PrefixError, match=r"adapter_model\.bin is pickled"):
        read(zip_of({CONFIG_NAME: GOOD[CONFIG_NAME], "adapter_model.bin": b"x"}))
    split = {f"a/{CONFIG_NAME}": GOOD[CONFIG_NAME], f"b/{WEIGHTS_NAME}": GOOD[WEIGHTS_NAME]}
    with pytest.raises(PrefixError, match="in one folder"):
        read(zip_of(split))
    two = {f"{d}/{n}": c for d in ("a", "b") for n, c in GOOD.items()}
    with pytest.raises(PrefixError, match=r"several adapters \(folders \['a', 'b'\]\)"):
        read(zip_of(two))
    with pytest.raises(PrefixError, match="could not be read"):
        read(b"PK\x03\x04 not really a zip")
    with pytest.raises(PrefixError, match="PEFT zip is too large"):
        read(zip_of(GOOD), max_bytes=100)
