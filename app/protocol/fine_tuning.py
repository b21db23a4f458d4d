"""Fine-tuning API bodies (`/v1/fine_tuning/jobs`): OpenAI's names and shapes, plus our prefix options.

The official client parses the responses as `FineTuningJob`, `FineTuningJobEvent` and
`FineTuningJobCheckpoint`. Values out of range are refused with a 400 naming the field (e.g.
`hyperparameters.n_epochs`); `"auto"` (OpenAI's "let the server choose") means our default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, model_validator

from app.protocol.common import OpenAIRequest, OpenAIResponse

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 1024
MAX_STEPS = 1_000_000
MAX_SEED = 2**31 - 1
MAX_METADATA = 16


def _auto(value: object) -> object:
    return None if value == "auto" else value


# `"auto"` or a value in range; "auto" becomes None (our default).
AutoEpochs = Annotated[Annotated[int, Field(ge=1, le=MAX_EPOCHS)] | None, BeforeValidator(_auto)]
AutoBatchSize = Annotated[Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] | None, BeforeValidator(_auto)]
AutoMultiplier = Annotated[Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] | None,
                           BeforeValidator(_auto)]


class Hyperparameters(OpenAIRequest):
    """OpenAI's three (n_epochs, batch_size, learning_rate_multiplier) and ours. Unknown keys are refused: a
    misspelt hyperparameter must not silently train with the default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    n_epochs: AutoEpochs = None
    batch_size: AutoBatchSize = None
    learning_rate_multiplier: AutoMultiplier = Field(
        default=None, description="a multiple of the default learning rate (3e-2 for a directly trained prefix)")
    learning_rate: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] | None = None
    max_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = Field(
        default=None, description="optimizer steps; wins over n_epochs")
    warmup_ratio: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] | None = None
    weight_decay: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    eval_every: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = Field(
        default=None, description="steps between validation passes")
    checkpoint_every: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = Field(
        default=None, description="steps between checkpoints (default: none)")

    @model_validator(mode="after")
    def _one_learning_rate(self) -> Hyperparameters:
        if self.learning_rate is not None and self.learning_rate_multiplier is not None:
            raise ValueError("give learning_rate or learning_rate_multiplier, not both")
        return self


class TrainingOptions(OpenAIRequest):
    """What a fine-tuning job and a personalization request share: hyperparameters, seed, prefix options."""

    hyperparameters: Hyperparameters | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    num_virtual_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="prefix length P (default 16, or the warm-start prefix's)")
    prefix_projection: bool | None = Field(
        default=None, description="train through Li & Liang's MLP reparameterization (default: directly)")
    encoder_hidden_size: Annotated[int, Field(ge=1, le=65536)] | None = None
    kind: Literal["prefix_tuning", "prompt_tuning"] | None = Field(
        default=None, description="what to train: `prefix_tuning` (default), per-layer keys and values, or "
        "`prompt_tuning`, a soft prompt of learned input embeddings (PEFT PROMPT_TUNING); prompt tuning takes no "
        "prefix_projection, encoder_hidden_size or on_top_of, and a warm start of the same kind")
    prefix_init: Literal["real_tokens", "random"] | None = Field(
        default=None, description="a new prefix starts from the model's activations of real tokens (default) "
        "or from random values; ignored with warm_start")
    warm_start: str | None = Field(
        default=None, description="start from one of your prefixes: `name` (its newest version) or `name@version`")
    on_top_of: Annotated[str, Field(min_length=1, max_length=1000)] | None = Field(
        default=None, description="train the prefix behind one of your prefixes (or a stack, `a@1+b`), frozen, as "
        "the stack `<on_top_of>+<this prefix>` is served; a name without a version is pinned to its newest now")
    validation_split: Annotated[float, Field(ge=0, le=0.5, allow_inf_nan=False)] | None = Field(
        default=None, description="fraction of the training examples held out for validation (no validation_file)")
    early_stopping_patience: Annotated[int, Field(ge=0, le=MAX_STEPS)] | None = Field(
        default=None, description="validation passes without improvement before stopping; 0 never stops early")


class SupervisedMethod(OpenAIRequest):
    hyperparameters: Hyperparameters | None = None


class Method(OpenAIRequest):
    """OpenAI's `method`; prefix-tuning is supervised only."""

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None


class FineTuningJobCreate(TrainingOptions):
    """`POST /v1/fine_tuning/jobs`."""

    model: str = Field(description="the served base model's id (GET /v1/models)")
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(
        default=None, description="the name of the prefix to train (a new one, or the next version of yours); "
                                  "default: a generated `ft-...` name")
    method: Method | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=MAX_METADATA)] | None = None

    @model_validator(mode="after")
    def _one_place_for_hyperparameters(self) -> FineTuningJobCreate:
        if self.method is not None and self.method.type != "supervised":
            raise ValueError(f"method.type {self.method.type!r} is not supported: prefix-tuning is supervised")
        if self.hyperparameters is not None and self.method is not None and self.method.supervised is not None \
                and self.method.supervised.hyperparameters is not None:
            raise ValueError("give hyperparameters either at the top level or in method.supervised, not both")
        if any(len(k) > 64 for k in self.metadata or {}):
            raise ValueError("metadata keys are at most 64 characters")
        return self

    @property
    def effective_hyperparameters(self) -> Hyperparameters | None:
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters or self.hyperparameters
        return self.hyperparameters


# ---- responses -----------------------------------------------------------------------------------------------
class JobError(OpenAIResponse):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(OpenAIResponse):
    """OpenAI's job object. `fine_tuned_model` is the `model` to send in requests once the job succeeded
    (`<suffix>@<version>`, `user:<id>@<version>` for a personal prefix). Ours: `suffix` (the prefix name),
    `user` (the end user of a personalization job), `prefix_options`, `on_top_of` (the base it trains behind)."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: JobStatus
    trained_tokens: int | None = None
    training_file: str | None = None
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    suffix: str
    user: str | None = None
    prefix_options: dict[str, Any]
    on_top_of: str | None = Field(
        default=None, description="the pinned versions the prefix is trained on top of (`support-bot@3`), if any")


class FineTuningJobList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(OpenAIResponse):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] = "message"


class FineTuningJobEventList(OpenAIResponse):
    """Newest first, as OpenAI lists them; `after=<event id>` pages on to older events."""

    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class FineTuningJobCheckpoint(OpenAIResponse):
    """A prefix saved during training. `fine_tuned_model_checkpoint` identifies it (not a servable model)."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float]
    step_number: int


class FineTuningJobCheckpointList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
