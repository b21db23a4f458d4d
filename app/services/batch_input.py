"""A Batch API input file, read and checked as a whole before any of its requests runs.

One request per line: `{"custom_id": "...", "method": "POST", "url": <the batch's endpoint>, "body": {...}}`.
Blank lines are skipped; line numbers count every line of the file, from 1. The check covers the file's form
(JSON, the four fields, unique custom ids); a request's body is checked when it runs, exactly as the endpoint
checks it, and a bad one is that request's 400 in the error file, not the batch's failure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from app.protocol.batches import BatchError

MAX_CUSTOM_ID: Final = 512
MAX_REPORTED: Final = 100  # errors listed for a failed batch (the first ones, by line)


@dataclass(frozen=True)
class BatchLine:
    """One request of the file."""

    line: int  # its line in the file, from 1
    custom_id: str
    body: dict[str, Any]


def _error(code: str, message: str, *, line: int | None = None, param: str | None = None) -> BatchError:
    return BatchError(code=code, message=message, param=param, line=line)


def _check(obj: Any, n: int, endpoint: str) -> BatchError | None:
    """What is wrong with line `n`'s object, or None."""
    if not isinstance(obj, dict):
        return _error("invalid_request", f"line {n}: expected a JSON object, got {type(obj).__name__}", line=n)
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _error("missing_custom_id", f"line {n}: `custom_id` must be a non-empty string", line=n,
                      param="custom_id")
    if len(custom_id) > MAX_CUSTOM_ID:
        return _error("invalid_custom_id", f"line {n}: `custom_id` has {len(custom_id)} characters, at most "
                      f"{MAX_CUSTOM_ID} are accepted", line=n, param="custom_id")
    if obj.get("method") != "POST":
        return _error("invalid_method", f"line {n}: `method` must be \"POST\", got {obj.get('method')!r:.40}",
                      line=n, param="method")
    if obj.get("url") != endpoint:
        return _error("invalid_url", f"line {n}: `url` must be the batch's endpoint {endpoint!r}, got "
                      f"{obj.get('url')!r:.80}", line=n, param="url")
    if not isinstance(obj.get("body"), dict):
        return _error("invalid_body", f"line {n}: `body` must be a JSON object (the request)", line=n, param="body")
    unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if unknown:
        return _error("invalid_request", f"line {n}: unknown field {unknown[0]!r:.40}", line=n, param=unknown[0])
    return None


def parse_batch_input(data: bytes, *, endpoint: str, max_lines: int) -> tuple[list[BatchLine], list[BatchError]]:
    """(the requests, the errors): the batch runs only when there are no errors (at most MAX_REPORTED listed)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], [_error("invalid_file", f"the file is not UTF-8 text (byte {exc.start})")]
    lines: list[BatchLine] = []
    errors: list[BatchError] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        if len(errors) >= MAX_REPORTED:
            break
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            errors.append(_error("invalid_json_line", f"line {n}: not valid JSON ({exc.msg}, column {exc.colno})",
                                 line=n))
            continue
        problem = _check(obj, n, endpoint)
        if problem is not None:
            errors.append(problem)
            continue
        if obj["custom_id"] in seen:
            errors.append(_error("duplicate_custom_id", f"line {n}: custom_id {obj['custom_id']!r:.80} is already "
                                 f"used on line {seen[obj['custom_id']]}", line=n, param="custom_id"))
            continue
        seen[obj["custom_id"]] = n
        lines.append(BatchLine(n, obj["custom_id"], obj["body"]))
    if not errors and not lines:
        errors.append(_error("empty_file", "the file holds no requests"))
    if len(lines) > max_lines:
        errors.append(_error("too_many_requests", f"the file holds {len(lines)} requests; at most {max_lines} are "
                             "accepted in one batch"))
    return lines, errors
