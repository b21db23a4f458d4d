"""The engine's interface as the web layer sees it: what a request hands over, what comes back, what can fail.

The prefix a request uses is prefix_store/ref.py's PrefixRef, the same record the catalog returns.

Torch-free on purpose: the web layer and the services import this module at their top, and the app starts (and
its tests run) without loading torch. The engine's implementation (app/engine/client.py, loop.py, sampling.py)
builds on these types.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from prefix_store.ref import PrefixRef

# What a request puts in front of its prompt: nothing, one prefix version, or a stack of them, first part first
# (their keys and values concatenated along the sequence; docs/prefix-format.md, "Stacking").
PrefixSelection = PrefixRef | tuple[PrefixRef, ...] | None

FinishReason = Literal["stop", "length", "cancelled", "error"]
# Why a request ended in "error": the API maps these to statuses without reading messages.
ErrorKind = Literal["prefix_unavailable", "too_large", "timeout", "internal"]
# Who waits for a request: "interactive" (an API client) is always admitted before "batch" (the Batch API's
# runner), and a batch row gives its place up to an interactive request that needs it (docs/batching.md).
Priority = Literal["interactive", "batch"]

MAX_TOP_LOGPROBS: Final = 20  # OpenAI's cap on returned alternatives


class EngineError(Exception):
    """Base of the engine's errors."""


class EngineOverloaded(EngineError):
    """The waiting queue is full; the caller should retry later."""


class RequestTooLarge(EngineError):
    """A request can never fit the batch token budget."""


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; the message names it."""


StructuredKind = Literal["json_schema", "regex", "grammar", "choice"]


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on what a request may generate, enforced token by token (app/engine/structured.py).

    kind / spec: "json_schema" (the schema as compact JSON, its key order kept: required properties are generated
    in the order the schema lists them), "regex" (the whole output matches it), "grammar" (Lark or GBNF/EBNF) or
    "choice" (a JSON list of strings: the output is exactly one of them). whitespace (json_schema only): None =
    the default (at most 20 whitespace characters between two JSON tokens), "" = none at all, else a regex for
    it. param: the request field that asked for it, which an invalid spec's 400 names (not part of equality:
    equal constraints share one compiled grammar).
    """

    kind: StructuredKind
    spec: str
    whitespace: str | None = None
    param: str = field(default="structured_outputs", compare=False)


class StructuredOutputError(ValueError):
    """A structured-output spec that cannot be compiled (bad schema, regex or grammar); the API's 400 names
    `param`, the request field it came from."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of token selection and of when generation ends. temperature 0 = greedy.

    ignore_eos: an EOS token does not end the row (it is emitted as an ordinary token, with no text since special
    tokens are skipped); only max_tokens, a stop string or the context end do.
    min_tokens: EOS cannot be chosen for the first min_tokens tokens (its logits are -inf), and a stop string ends
    the row only if it ends after the text of those tokens (vLLM's rule: one inside them is kept as text).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None = off; k = also return the k most likely alternatives
    ignore_eos: bool = False
    min_tokens: int = 0
    structured: StructuredOutput | None = None  # a grammar the output must follow; the row ends ("stop") with it
    # vLLM's logits controls (app/engine/logits_processors.py). Penalties: presence/frequency act on the tokens this
    # row generated, repetition (HF style: positive logits divided, negative multiplied) on its prompt's and its
    # generated tokens; 0 / 0 / 1 = off.
    min_p: float = 0.0  # drop tokens whose probability < min_p * the likeliest's (after temperature); 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), ids distinct
    stop_token_ids: tuple[int, ...] = ()  # end the row like EOS (the token is not in the text; "stop")

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise SamplingParamsError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise SamplingParamsError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise SamplingParamsError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SamplingParamsError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingParamsError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise SamplingParamsError("stop strings must not be empty")
        self._check_logits_controls()

    def _check_logits_controls(self) -> None:
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise SamplingParamsError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise SamplingParamsError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        ids = [t for t, _ in self.logit_bias]
        if len(set(ids)) != len(ids) or any(t < 0 for t in ids):
            raise SamplingParamsError(f"logit_bias must map distinct non-negative token ids, got ids {ids}")
        bad = next((b for _, b in self.logit_bias if not -100.0 <= b <= 100.0), None)
        if bad is not None:
            raise SamplingParamsError(f"logit_bias values must be in [-100, 100], got {bad}")
        if any(t < 0 for t in self.stop_token_ids):
            raise SamplingParamsError(f"stop_token_ids must be non-negative, got {list(self.stop_token_ids)}")

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (the row then keeps counts of its tokens)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows to inf and the softmax to NaN: the limit is the argmax anyway.
        return self.temperature < 1e-5


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (or the final event). `text` is the newly final text, possibly empty."""

    request_id: str
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_kind: ErrorKind | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


class EngineClientProtocol(Protocol):
    """Tokenize, and stream a request's token events. The served implementation is app/engine/client.py's
    EngineClient; HTTP-layer tests use a fake of the same shape."""

    @property
    def model_id(self) -> str: ...

    @property
    def context_length(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The conversation through the model's chat template, with `tools` (OpenAI's shape) and the messages'
        tool calls and results rendered as the template can (app/engine/tool_template.py)."""
        ...

    def token_text(self, token_id: int) -> str: ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of a token sequence (special tokens kept), e.g. a token-id prompt echoed back."""
        ...

    def generate(self, *, prompt_ids: list[int], sampling: SamplingParams, prefix: PrefixSelection = None,
                 request_id: str | None = None, priority: Priority = "interactive") -> AsyncIterator[TokenEvent]:
        """Stream token events; stopping the iteration early cancels the request in the engine. `prefix`: the
        version (or the stack of versions) the caller read from the catalog; the engine loads exactly that
        content. `priority` "batch":
        admitted only where no interactive request waits, restarted from its first token when an interactive
        one needs its row, so its events arrive together once it has finished; it has no request timeout."""
        ...
