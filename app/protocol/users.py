"""Personalization API bodies (`/v1/users/{user_id}`): an application's end users, their training examples,
and the personal prefix trained for each (served as `model: "user:<user_id>"`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field

from app.protocol.common import OpenAIRequest, OpenAIResponse
from app.protocol.fine_tuning import TrainingOptions
from app.protocol.models import KIND_DESCRIPTION, PrefixKind

MAX_EXAMPLES_PER_REQUEST = 1000


class ExamplesCreate(OpenAIRequest):
    """`POST /v1/users/{user_id}/examples`: records in the training-file forms (`prompt`/`completion`, or
    `messages`), appended to the user's examples."""

    examples: Annotated[list[Any], Field(min_length=1, max_length=MAX_EXAMPLES_PER_REQUEST)]


class ExamplesAdded(OpenAIResponse):
    object: Literal["end_user.examples"] = "end_user.examples"
    user: str
    added: int
    example_count: int


class PersonalizeRequest(TrainingOptions):
    """`POST /v1/users/{user_id}/personalize`. `warm_start` omitted: start from the user's current personal
    prefix (if any); a tenant prefix `name[@version]`: start from it; null: start from scratch."""


class PersonalPrefix(OpenAIResponse):
    model: str  # what to send as `model`: `user:<id>`
    version: int
    num_virtual_tokens: int
    kind: PrefixKind = Field(default="prefix_tuning", description=KIND_DESCRIPTION)
    created_at: datetime


class LastJob(OpenAIResponse):
    id: str
    status: str
    created_at: int
    finished_at: int | None = None
    fine_tuned_model: str | None = None


class EndUserInfo(OpenAIResponse):
    """`GET /v1/users/{user_id}`."""

    id: str  # the application's own id for the user
    object: Literal["end_user"] = "end_user"
    created_at: datetime
    example_count: int
    personal_prefix: PersonalPrefix | None
    last_job: LastJob | None


class EndUserList(OpenAIResponse):
    """`GET /v1/users`: newest first; `has_more` with `after=<last id>` pages on."""

    object: Literal["list"] = "list"
    data: list[EndUserInfo]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class EndUserDeleted(OpenAIResponse):
    """`DELETE /v1/users/{user_id}`: everything of the user is gone (training jobs are kept, cancelled, without
    the user: they are the tenant's record of usage)."""

    id: str
    object: Literal["end_user"] = "end_user"
    deleted: bool = True
    examples_deleted: int
    prefix_versions_deleted: int
    jobs_cancelled: int
