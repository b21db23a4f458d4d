"""Files API bodies (`/v1/files`), OpenAI's shapes: the official client parses them as `FileObject`.

Uploads are multipart (`file`, `purpose`), not JSON; only `purpose: "fine-tune"` (JSONL training data) exists
here, and a file is validated line by line before it is stored, so every stored file is `processed`.
"""

from __future__ import annotations

from typing import Literal

from app.protocol.common import OpenAIResponse

FilePurpose = Literal["fine-tune"]


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
