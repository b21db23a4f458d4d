"""Reading prefix uploads safely and turning them into our native format.

Size: the request body is counted while it streams in (`limited_receive`), so a client cannot make us spool
more than the upload limit plus some multipart overhead; each file part is then read in chunks up to the
limit. Content: routed by sniffing (safetensors header vs zip magic), never by file name, and decoded only by
the codec's safetensors/zip readers (nothing is ever unpickled). Torch is imported lazily, inside functions.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.types import Message, Receive

from app.errors import InvalidRequest, PayloadTooLarge

if TYPE_CHECKING:
    from prefix_store.kinds import PrefixKind
    from prefix_store.peft_codec import PeftInfo
    from prefix_store.types import ModelSpec, PrefixTensors

log = logging.getLogger(__name__)

# Room for multipart boundaries, part headers and the `name` field on top of the file bytes.
MULTIPART_OVERHEAD = 64 * 1024
CHUNK = 1 << 20
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
PEFT_NAMES = ("adapter_config.json", "adapter_model.safetensors")


class AsyncReadable(Protocol):
    """What we need of an uploaded file part (starlette's UploadFile)."""

    filename: str | None

    async def read(self, size: int = -1) -> bytes: ...


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"upload exceeds the limit of {limit} bytes")


def check_content_length(header: str | None, limit: int) -> None:
    """Refuse before reading anything when the declared body is larger than the limit plus overhead."""
    if header is not None and header.strip().isdigit() and int(header) > limit + MULTIPART_OVERHEAD:
        raise too_large(limit)


def limited_receive(receive: Receive, limit: int) -> Receive:
    """Wrap an ASGI `receive` so the body stops (413) once it passes limit + MULTIPART_OVERHEAD bytes."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit + MULTIPART_OVERHEAD:
                raise too_large(limit)
        return message

    return wrapped


async def read_part(part: AsyncReadable, *, limit: int, already: int = 0) -> bytes:
    """Read one file part in chunks; 413 once it (plus `already` bytes of earlier parts) passes `limit`."""
    chunks: list[bytes] = []
    total = already
    while chunk := await part.read(CHUNK):
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class Converted:
    """An upload checked against the served model and re-encoded in the native format."""

    native: bytes
    num_virtual_tokens: int
    source_format: str  # "native" | "peft"
    kind: PrefixKind = "prefix_tuning"  # a KV prefix, or a soft prompt (PEFT PROMPT_TUNING / P_TUNING)
    recorded_base_model: str | None = None
    warnings: list[str] = field(default_factory=list)


def _sniff_error(data: bytes, what: str) -> InvalidRequest:
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return InvalidRequest(f"{what} is a Python pickle; pickles are never loaded: upload safetensors",
                              param="file", code="invalid_file")
    return InvalidRequest(
        f"{what} is neither a safetensors prefix nor a zip of a PEFT adapter directory", param="file",
        code="invalid_file",
    )


def convert_upload(
    files: list[tuple[str, bytes]], *, spec: ModelSpec, max_virtual_tokens: int, max_bytes: int
) -> Converted:
    """Decode an upload against `spec` and re-encode it natively with the served model's fingerprint.

    files: [(file name, bytes)] -- one file (native .safetensors or a PEFT zip, told apart by content), or
    the two files of a PEFT adapter directory (told apart by name). A PEFT adapter is PREFIX_TUNING (keys and
    values) or PROMPT_TUNING / P_TUNING (a soft prompt; P_TUNING's prompt encoder is run once here when the file
    holds its weights). Raise InvalidRequest on bad input.
    """
    # torch: the codecs import it, and the web side stays torch-free at import
    from prefix_store.codec import encode_stored, is_safetensors
    from prefix_store.types import PrefixError  # the same reason

    info: PeftInfo | None
    try:
        if len(files) == 2:
            kv, info = _decode_peft_pair(files, spec, max_virtual_tokens, max_bytes)
        # A header start but a bad length (truncated) still goes to the codec, for its precise message.
        elif is_safetensors(files[0][1]) or files[0][1][8:9] == b"{":
            kv, info = _decode_native(files[0][1], spec, max_virtual_tokens, max_bytes), None
        elif files[0][1][:4] in ZIP_MAGICS:
            from prefix_store.peft_soft import decode_peft_adapter_zip  # imports torch: only a zip upload needs it

            kv, info = decode_peft_adapter_zip(files[0][1], spec=spec, max_virtual_tokens=max_virtual_tokens,
                                               max_bytes=max_bytes)
        else:
            raise _sniff_error(files[0][1], f"file {files[0][0]!r}")
        if info is None:
            return Converted(encode_stored(kv), kv.num_virtual_tokens, "native", _kind(kv))
        native = encode_stored(dataclasses.replace(kv, base_fingerprint=spec.fingerprint))
    except PrefixError as exc:
        raise InvalidRequest(str(exc), param="file", code="invalid_prefix") from None
    warnings = []
    if info.name_mismatch:
        warnings.append(
            f"the adapter records base model {info.base_model_name_or_path!r}, the served model is "
            f"{spec.model_id!r}; accepted because its shapes match"
        )
    return Converted(native, kv.num_virtual_tokens, "peft", _kind(kv), info.base_model_name_or_path, warnings)


def _kind(prefix: PrefixTensors) -> PrefixKind:
    from prefix_store.types import SoftPrompt  # torch: see convert_upload

    return prefix.kind if isinstance(prefix, SoftPrompt) else "prefix_tuning"


def _decode_native(data: bytes, spec: ModelSpec, max_virtual_tokens: int, max_bytes: int) -> PrefixTensors:
    # torch: the codecs import it, and the web side stays torch-free at import
    from prefix_store.codec import decode_stored

    return decode_stored(data, spec=spec, max_virtual_tokens=max_virtual_tokens, max_bytes=max_bytes)


def _decode_peft_pair(
    files: list[tuple[str, bytes]], spec: ModelSpec, max_virtual_tokens: int, max_bytes: int
) -> tuple[PrefixTensors, PeftInfo]:
    # torch: the codecs import it, and the web side stays torch-free at import
    from prefix_store.peft_soft import decode_peft_adapter

    by_name = {name.replace("\\", "/").rsplit("/", 1)[-1]: data for name, data in files}
    if set(by_name) != set(PEFT_NAMES):
        found = sorted(by_name)
        hint = " (adapter_model.bin is pickled and never loaded)" if "adapter_model.bin" in found else ""
        raise InvalidRequest(
            f"the two `files` must be {' and '.join(PEFT_NAMES)}, found {found}{hint}", param="files",
            code="invalid_file",
        )
    return decode_peft_adapter(by_name[PEFT_NAMES[0]], by_name[PEFT_NAMES[1]], spec=spec,
                               max_virtual_tokens=max_virtual_tokens, max_bytes=max_bytes)


def refuse_unknown_fields(form: FormData, known: set[str]) -> None:
    """A form field the endpoint does not take is a 400 naming it, as an undeclared JSON field is (app/errors.py):
    never silently dropped."""
    unknown = sorted(set(form.keys()) - known)
    if unknown:
        raise InvalidRequest(f"`{unknown[0]}` is not supported", param=unknown[0], code="unsupported_parameter")


async def read_prefix_form(request: Request, *, limit: int) -> tuple[str, list[tuple[str, bytes]]]:
    """Parse `POST /v1/prefixes`: field `name`, and `file` once or `files` twice. The body is counted while
    it streams (413 past limit + overhead) and the file parts together may hold at most `limit` bytes."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("send multipart/form-data with a `name` field and a `file` (or two `files`)")
    limited = Request(request.scope, limited_receive(request.receive, limit))
    async with limited.form(max_files=4, max_fields=8) as form:
        name = form.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("missing form field `name` (the prefix name)", param="name",
                                 code="missing_name")
        single, pair = form.getlist("file"), form.getlist("files")
        if single and pair:
            raise InvalidRequest("send either `file` or `files`, not both", param="file")
        if not single and not pair:
            raise InvalidRequest("missing `file` (a .safetensors prefix or a PEFT zip) or `files` (a PEFT "
                                 "adapter's adapter_config.json and adapter_model.safetensors)", param="file")
        parts = single or pair
        if len(parts) != (1 if single else 2):
            which = "`file` once" if single else "`files` exactly twice"
            raise InvalidRequest(f"send {which}, found {len(parts)} parts",
                                 param="file" if single else "files")
        refuse_unknown_fields(form, {"name", "file", "files"})
        files: list[tuple[str, bytes]] = []
        total = 0
        for part in parts:
            if not isinstance(part, UploadFile):
                raise InvalidRequest("`file`/`files` must be file parts (with a filename), not text fields",
                                     param="file")
            data = await read_part(part, limit=limit, already=total)
            total += len(data)
            if not data:
                raise InvalidRequest(f"uploaded file {part.filename!r} is empty", param="file")
            files.append((part.filename or "", data))
    return name, files
