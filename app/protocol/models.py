"""`GET /v1/models` bodies: the base model and the caller's prefixes (virtual models), and a stack of prefixes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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


class StackPart(OpenAIResponse):
    """One prefix version of a stack, as the stack's id resolves it now."""

    name: str
    version: int
    num_virtual_tokens: int
    on_top_of: str | None = Field(
        default=None, description="The prefix versions this one was trained on top of (`support-bot@3`), if any.")


class StackModelCard(ModelCard):
    """A stack of prefixes (`support-bot+user:ann`): its parts in order, and their virtual tokens together."""

    prefixes: list[StackPart]
    num_virtual_tokens: int
