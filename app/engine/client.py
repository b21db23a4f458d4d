"""The served implementation of app/engine/protocol.py's EngineClientProtocol (no torch types cross it).

Tokenization (prompts, chat templates) and prefix resolution happen here, so routes deal only in text, ids and
events. HTTP-layer unit tests replace this class with a fake of the same shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from app.engine.loop import Engine
from app.engine.protocol import PrefixSelection, Priority, SamplingParams, TokenEvent
from app.engine.structured import StructuredCompiler
from app.engine.tool_template import hermes_messages, knows_tools, native_messages
from app.engine.types import GenerationRequest
from prefix_store.ref import PrefixRef
from prefix_store.resolver import PrefixResolver
from prefix_store.types import PrefixTensors


class EngineClient:
    """Tokenize, resolve the prefix off the engine thread, and stream the engine's events."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        resolver: PrefixResolver | None,
        model_id: str,
        context_length: int,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.resolver = resolver
        self.model_id = model_id
        self.context_length = context_length
        self._structured: StructuredCompiler | None = None

    @property
    def structured(self) -> StructuredCompiler:
        """Compiles and caches structured-output constraints for this tokenizer (made at the first one)."""
        if self._structured is None:
            vocab = getattr(self.engine.runner.model.config, "vocab_size", None) or len(self.tokenizer)
            self._structured = StructuredCompiler(self.tokenizer, vocab_size=int(vocab),
                                                  eos_token_ids=self.engine.eos_token_ids)
        return self._structured

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The model's chat template, ending with the assistant turn's opening. Tools and tool calls go to a
        template that knows them as HF expects them, to one that does not in the Hermes format (tool_template)."""
        extra: dict[str, Any] = {}
        if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            if knows_tools(getattr(self.tokenizer, "chat_template", None)):
                messages, extra = native_messages(messages), {"tools": tools} if tools else {}
            else:
                messages = hermes_messages(messages, tools)
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
        if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in recent transformers
            out = out["input_ids"]
        return [int(t) for t in out]

    def token_text(self, token_id: int) -> str:
        text: str = self.tokenizer.decode([token_id])
        return text

    def decode(self, token_ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(list(token_ids))
        return text

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _loader(self, ref: PrefixRef | tuple[PrefixRef, ...]) -> Callable[[], PrefixTensors]:
        """Loads `ref` (or a stack: its parts, concatenated) on the engine's loader thread (a cold load never
        stalls a step)."""
        resolver = self.resolver
        if resolver is None:
            raise RuntimeError("no prefix resolver configured")
        if isinstance(ref, tuple):
            return lambda: resolver.load_stack(ref)
        return lambda: resolver.load(ref).kv

    async def generate(
        self,
        *,
        prompt_ids: list[int],
        sampling: SamplingParams,
        prefix: PrefixSelection = None,
        request_id: str | None = None,
        priority: Priority = "interactive",
    ) -> AsyncIterator[TokenEvent]:
        """Stream token events; stopping the iteration early cancels the request in the engine. `priority`: see
        app/engine/protocol.py EngineClientProtocol.generate."""
        # A constraint is compiled (or found in the cache) before the request is queued, off the engine thread;
        # an invalid one raises StructuredOutputError here, which the API answers with a 400.
        grammar = await self.structured.row_grammar(sampling.structured) if sampling.structured else None
        req = GenerationRequest(
            prompt_ids=prompt_ids,
            sampling=sampling,
            grammar=grammar,
            prefix=self._loader(prefix) if prefix is not None else None,
            priority=priority,
        )
        if request_id is not None:
            req.request_id = request_id
        async for ev in self.engine.submit(req):
            yield ev
