"""Parsing an OpenAI-style SSE body in tests."""

from __future__ import annotations

import json
from typing import Any


def sse_payloads(body: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded; the final `[DONE]` is returned as the string."""
    out: list[Any] = []
    for line in body.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
