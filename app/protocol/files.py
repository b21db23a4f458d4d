"""Files API bodies (`/v1/files`), OpenAI's shapes: the official client parses them as `FileObject`.

Uploads are multipart (`file`, `purpose`), not JSON. Purposes: `fine-tune` (JSONL training data, validated line
by line before it is stored), `batch` (a Batch API input file, JSONL requests: its lines are checked when a batch is
created from it) and `batch_output` (a batch's output and error files, written by the server, never uploaded).
Every stored file is `processed`.
"""

from __future__ import annotations

from typing import Literal

from app.protocol.common import OpenAIResponse

FilePurpose = Literal["fine-tune", "batch", "batch_output"]


class FileObject(OpenAIResponse):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int  # unix seconds
    filename: str
    purpose: FilePurpose
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(OpenAIResponse):
    """Newest first; `has_more` with `after=<last id>` pages on (the client's cursor pagination)."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(OpenAIResponse):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
