"""Per-request state on the engine thread: detokenizer, stop conditions, and the event callback."""

from __future__ import annotations

from collections.abc import Callable

from app.engine.detok import Decoder, IncrementalText
from app.engine.sampling import TokenChoice
from app.engine.types import ErrorKind, FinishReason, GenerationRequest, TokenEvent
from prefix_store.types import PrefixTensors


class ActiveRequest:
    """A request from submission to its final event. Touched only by the engine thread."""

    def __init__(
        self, request: GenerationRequest, tokenizer: Decoder, emit: Callable[[TokenEvent], object]
    ) -> None:
        self.request = request
        self.request_id = request.request_id
        self.prefix: PrefixTensors | None = None
        self.text = IncrementalText(tokenizer, request.sampling.stop, request.sampling.min_tokens)
        self.completion_tokens = 0
        self.done = False
        self.queued = True  # counts against the engine's waiting limit until admitted or finished
        self.deadline: float | None = None  # time.monotonic() past which the engine ends it (request timeout)
        self._emit = emit

    @property
    def prefix_len(self) -> int:
        return self.prefix.num_virtual_tokens if self.prefix is not None else 0

    @property
    def budget_tokens(self) -> int:
        """KV tokens this row may come to hold: its prefix, prompt and every token it may generate."""
        return self.prefix_len + len(self.request.prompt_ids) + self.request.sampling.max_tokens

    def on_token(self, choice: TokenChoice, *, eos: frozenset[int], at_context_end: bool) -> None:
        """Account for one generated token and emit its event (the final one when a stop condition holds)."""
        params = self.request.sampling
        self.completion_tokens += 1
        # With ignore_eos an EOS is an ordinary token; EOS before min_tokens cannot come (select_tokens masks it).
        # A stop token id ends the row whatever ignore_eos says, and is not in the text (vLLM).
        is_eos = (choice.token_id in eos and not params.ignore_eos) or choice.token_id in params.stop_token_ids
        text = "" if is_eos else self.text.add(choice.token_id)
        reason: FinishReason | None = None
        grammar = self.request.grammar  # structured outputs: a complete grammar takes no more tokens
        if is_eos or self.text.stopped or (grammar is not None and grammar.finished):
            reason = "stop"
        elif self.completion_tokens >= params.max_tokens or at_context_end:
            reason = "length"
        if reason is not None:
            text += self.text.flush()
        if grammar is not None and grammar.error is not None:  # a matcher that failed: never a silent "stop"
            self._send(choice.token_id, text, choice, "error", f"structured output: {grammar.error}", "internal")
            return
        self._send(choice.token_id, text, choice, reason)

    def finish(self, reason: FinishReason, error: str | None = None, kind: ErrorKind | None = None) -> None:
        """End the request without a new token (cancelled, failed)."""
        self._send(None, "", None, reason, error, kind)

    def _send(
        self,
        token_id: int | None,
        text: str,
        choice: TokenChoice | None,
        reason: FinishReason | None,
        error: str | None = None,
        kind: ErrorKind | None = None,
    ) -> None:
        if self.done:
            return
        if reason is not None:
            self.done = True
        self._emit(
            TokenEvent(
                request_id=self.request_id,
                token_id=token_id,
                text=text,
                logprob=choice.logprob if choice else None,
                top_logprobs=choice.top_logprobs if choice else (),
                finish_reason=reason,
                prompt_tokens=len(self.request.prompt_ids),
                completion_tokens=self.completion_tokens,
                error=error,
                error_kind=kind,
            )
        )
