"""A fake EngineClient for HTTP-layer tests: the only fake allowed (the engine boundary).

Tokens are characters (id = code point, vocabulary 256). Each request answers a fixed script that names what
served it, so tests can see which prefix and version a `model` resolved to: the base model says `hello world`,
a prefix says `<name@version>`, a stack `<a@1+b@2>`; a seed, when given, is appended as `#seed`. Stop strings
end the text as the engine does (the stop string itself is not returned). Every call and every cancellation is
recorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI

from app.api.deps import get_served_fingerprint
from app.engine.sampling import SamplingParams
from app.engine.types import TokenEvent
from prefix_store.ref import PrefixRef

EOS = 0
FAKE_FINGERPRINT = "fake"  # the base model the fake engine "serves" (conftest's prefix rows are made for it)


def with_fake_model(app: FastAPI) -> FastAPI:
    """The app serving a fake engine has no model loaded: answer the fake model's fingerprint where routes ask
    for the served one."""
    app.dependency_overrides[get_served_fingerprint] = lambda: FAKE_FINGERPRINT
    return app


@dataclass
class Call:
    prompt_ids: list[int]
    sampling: SamplingParams
    prefix: PrefixRef | tuple[PrefixRef, ...] | None
    request_id: str
    cancelled: bool = False
    finished: bool = False
    first_sent: bool = False  # its first token is out (with `hold_after_first`)
    priority: str = "interactive"


@dataclass
class FakeEngineClient:
    """Same surface as app.engine.client.EngineClient."""

    model_id: str = "fake-base"
    context_length: int = 128
    vocab_size: int = 256
    token_delay_s: float = 0.0  # sleep before each token (disconnect tests)
    raise_on_submit: Exception | None = None  # raised at the first iteration, as the engine's admission does
    error_event: str | None = None  # the first event is a final error event with this message
    error_kind: str | None = None  # ... and this ErrorKind
    hold_after_first: asyncio.Event | None = None  # every request waits for it after its first token
    # Each token's logprob (when logprobs are asked) given the request's sampling; -0.5 when not set.
    logprob_of: Callable[[SamplingParams], float] | None = None
    calls: list[Call] = field(default_factory=list)

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return [ord(c) % self.vocab_size for c in prompt]
        return [int(t) for t in prompt]

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        if any(m["role"] == "assistant" and "{%" in (m["content"] or "") for m in messages):
            raise ValueError("template error")  # a template refusing the conversation
        text = "".join(f"{m['role']}:{m['content']}\n" for m in messages) + "assistant:"
        if tools:
            text = "tools:" + ",".join(t["function"]["name"] for t in tools) + "\n" + text
        return self.encode_prompt(text)

    def token_text(self, token_id: int) -> str:
        return "" if token_id == EOS else chr(token_id)

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(self.token_text(t) for t in token_ids)

    def script(self, prefix: PrefixRef | tuple[PrefixRef, ...] | None, sampling: SamplingParams) -> str:
        parts = () if prefix is None else prefix if isinstance(prefix, tuple) else (prefix,)
        text = "hello world" if not parts else "<" + "+".join(f"{p.name}@{p.version}" for p in parts) + ">"
        return text + (f"#{sampling.seed}" if sampling.seed is not None else "")

    @property
    def cancelled(self) -> list[Call]:
        return [c for c in self.calls if c.cancelled]

    async def generate(
        self, *, prompt_ids: list[int], sampling: SamplingParams,
        prefix: PrefixRef | tuple[PrefixRef, ...] | None = None, request_id: str | None = None,
        priority: str = "interactive",
    ) -> AsyncIterator[TokenEvent]:
        call = Call(prompt_ids, sampling, prefix, request_id or "", priority=priority)
        self.calls.append(call)
        if self.raise_on_submit is not None:
            raise self.raise_on_submit
        common: dict[str, Any] = {"request_id": call.request_id, "prompt_tokens": len(prompt_ids)}
        if self.error_event is not None:
            call.finished = True
            yield TokenEvent(token_id=None, text="", finish_reason="error", error=self.error_event,
                             error_kind=self.error_kind, **common)
            return
        try:
            script = [ord(c) for c in self.script(prefix, sampling)] + [EOS]
            text = ""
            for n, tid in enumerate(script, start=1):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                piece = self.token_text(tid)
                text += piece
                hit = next((s for s in sampling.stop if s in text), None)
                reason = "stop" if tid == EOS or hit else ("length" if n >= sampling.max_tokens else None)
                if hit:
                    piece = piece[: len(piece) - (len(text) - text.index(hit))]
                k = sampling.logprobs
                yield TokenEvent(
                    token_id=tid, text=piece,
                    logprob=None if k is None else self.logprob_of(sampling) if self.logprob_of else -0.5,
                    top_logprobs=tuple((tid + j, -0.5 - j) for j in range(k or 0)),
                    finish_reason=reason, completion_tokens=n, **common,
                )
                if reason is not None:
                    break
                if n == 1 and self.hold_after_first is not None:
                    call.first_sent = True
                    await self.hold_after_first.wait()
            call.finished = True
        finally:
            if not call.finished:
                call.cancelled = True
