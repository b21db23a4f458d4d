"""Batch API bodies (`/v1/batches`), OpenAI's shapes: the official client parses them as `Batch`.

A batch runs the requests of an uploaded file (purpose `batch`), one JSON object a line:
`{"custom_id": "...", "method": "POST", "url": "/v1/completions", "body": {...}}`, in the background and at a lower
priority than interactive requests. Its results are files (purpose `batch_output`): the output file holds the
answered requests, the error file the others, one line each:
`{"id": "batch_req_...", "custom_id": "...", "response": {"status_code", "request_id", "body"}, "error": null}`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator

from app.protocol.common import OpenAIRequest, OpenAIResponse

BatchEndpoint = Literal["/v1/completions", "/v1/chat/completions"]
BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
MAX_METADATA_PAIRS = 16  # OpenAI's metadata limits
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


class BatchCreate(OpenAIRequest):
    """`POST /v1/batches`."""

    # Every field is honoured or refused: an unknown one (e.g. `output_expires_after`: files do not expire here)
    # is a 400 naming it.
    model_config = ConfigDict(extra="forbid", strict=True)

    input_file_id: str = Field(description="A file uploaded with purpose `batch`: one request per line.")
    endpoint: BatchEndpoint = Field(description="The endpoint every request of the file names as its `url`.")
    completion_window: Literal["24h"] = Field(
        description="Only `24h`: a batch not finished 24 hours after its creation expires (its finished requests "
                    "are kept in its output file).")
    metadata: Annotated[dict[str, str], Field(max_length=MAX_METADATA_PAIRS)] | None = Field(
        default=None, description="Up to 16 pairs; keys up to 64 characters, values up to 512.")

    @field_validator("metadata")
    @classmethod
    def _metadata_sizes(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for key, value in (v or {}).items():
            if len(key) > MAX_METADATA_KEY:
                raise ValueError(f"metadata keys may have at most {MAX_METADATA_KEY} characters, got {len(key)}")
            if len(value) > MAX_METADATA_VALUE:
                raise ValueError(f"metadata values may have at most {MAX_METADATA_VALUE} characters, got "
                                 f"{len(value)} for {key[:MAX_METADATA_KEY]!r}")
        return v


class BatchError(OpenAIResponse):
    """Why a batch failed its input check: `line` is the input file's line (1-based)."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(OpenAIResponse):
    total: int
    completed: int  # answered with a 2xx (in the output file)
    failed: int  # answered with an error (in the error file)


class InputTokensDetails(OpenAIResponse):
    cached_tokens: int = 0


class OutputTokensDetails(OpenAIResponse):
    reasoning_tokens: int = 0


class BatchUsage(OpenAIResponse):
    """Tokens of the batch's finished requests (prompt tokens counted once per request, as `usage` does)."""

    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class BatchObject(OpenAIResponse):
    """A batch (OpenAI's `batch` object; timestamps are unix seconds)."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: BatchEndpoint
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None
    usage: BatchUsage


class BatchList(OpenAIResponse):
    """Newest first; `has_more` with `after=<last id>` pages on (the client's cursor pagination)."""

    object: Literal["list"] = "list"
    data: list[BatchObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
