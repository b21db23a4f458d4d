"""`GET /v1/models` bodies: the base model and the caller's prefixes (virtual models)."""

from __future__ import annotations

from typing import Literal

from app.protocol.common import OpenAIResponse


class ModelCard(OpenAIResponse):
    """One model. `parent` is the base model's id (None for the base model itself)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None


class ModelList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[ModelCard]
