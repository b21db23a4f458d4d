"""`GET /v1/models` bodies: the base model and the caller's prefixes (virtual models), and a stack of prefixes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from app.protocol.common import OpenAIResponse

PrefixKind = Literal["prefix_tuning", "prompt_tuning", "p_tuning"]  # prefix_store/kinds.py
KIND_DESCRIPTION = ("What the prefix (its newest version, or the one named) holds: `prefix_tuning` per-layer keys and "
                    "values, `prompt_tuning` / `p_tuning` a soft prompt (learned input embeddings); None for the "
                    "base model.")


class ModelCard(OpenAIResponse):
    """One model. `parent` is the base model's id (None for the base model itself)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None
    kind: PrefixKind | None = Field(default=None, description=KIND_DESCRIPTION)


class ModelList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class StackPart(OpenAIResponse):
    """One prefix version of a stack, as the stack's id resolves it now."""

    name: str
    version: int
    num_virtual_tokens: int
    kind: PrefixKind = "prefix_tuning"
    on_top_of: str | None = Field(
        default=None, description="The prefix versions this one was trained on top of (`support-bot@3`), if any.")


class StackModelCard(ModelCard):
    """A stack of prefixes (`support-bot+user:ann`): its parts in order, and their virtual tokens together."""

    prefixes: list[StackPart]
    num_virtual_tokens: int
