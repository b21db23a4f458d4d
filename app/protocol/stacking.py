"""The fields that stack prefixes in completions and chat (app/services/stacks.py; README "Stacking prefixes").

`model` alone can name a stack (`support-bot+user:ann`); `prefixes` names it as a list, which also takes a
personal prefix whose end-user id contains `+` at any place in the stack.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from app.protocol.common import OpenAIRequest

MAX_PREFIXES_FIELD = 64  # a wire bound only; the served limit is PREFIXSERVE_MAX_STACK_PREFIXES


class StackFields(OpenAIRequest):
    """`prefixes` and `allow_base_mismatch`, shared by completions and chat."""

    prefixes: Annotated[list[Annotated[str, Field(min_length=1, max_length=300)]],
                        Field(min_length=1, max_length=MAX_PREFIXES_FIELD)] | None = Field(
        default=None,
        description=("The prefixes to put in front of the prompt, in order (a stack; each as `model` names one: "
                     "`name`, `name@version`, `user:<id>`), their virtual tokens one after another. Same as "
                     "joining them with `+` in `model`; with `prefixes`, `model` is the base model's id or that "
                     "same `+` form, anything else is a 400."))
    allow_base_mismatch: bool = Field(
        default=False,
        description=("Serve a prefix trained on top of another prefix version even when the request puts another "
                     "version (or nothing) in front of it; otherwise that is a 409 `base_prefix_mismatch`."))
