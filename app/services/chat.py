"""Serving `POST /v1/chat/completions`: the model's chat template, then the engine path of completions."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from app.engine.protocol import EngineClientProtocol, TokenEvent
from app.errors import InvalidRequest, ServiceError
from app.protocol.chat import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    TokenLogprob,
    TopLogprob,
)
from app.protocol.common import Usage
from app.services.access import Access
from app.services.db_calls import DbCalls
from app.services.generation import Generation, collect, error_payload, start_generation
from app.services.sampling_options import sampling_params
from app.services.structured import structured_output
from app.services.targets import check_prompt, completion_budget, request_target
from app.services.tool_stream import ToolStream
from app.services.tools import ChatTools, assistant_message, chat_tools, one_constraint

log = logging.getLogger(__name__)


def encode_messages(req: ChatCompletionRequest, engine: EngineClientProtocol,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of the conversation (and `tools`) through the model's chat template (a template error is the
    client's)."""
    try:
        return engine.encode_chat([m.template_message() for m in req.messages], tools=tools)
    except Exception as exc:  # jinja2 raises TemplateError subclasses (and templates may `raise_exception`)
        log.info("chat template refused the messages: %r", exc)
        raise InvalidRequest(f"the messages do not fit the model's chat template: {exc}",
                             param="messages") from None


def chat_logprobs(engine: EngineClientProtocol, events: list[TokenEvent]) -> ChoiceLogprobs:
    """OpenAI chat logprobs of `events`' tokens, with the top alternatives the engine returned."""
    content = []
    for ev in events:
        if ev.token_id is None or ev.logprob is None:
            continue
        token = engine.token_text(ev.token_id)
        tops = []
        for tid, lp in ev.top_logprobs:
            text = engine.token_text(tid)
            tops.append(TopLogprob(token=text, logprob=lp, bytes=list(text.encode())))
        content.append(TokenLogprob(token=token, logprob=ev.logprob, bytes=list(token.encode()),
                                    top_logprobs=tops))
    return ChoiceLogprobs(content=content)


async def serve_chat(
    req: ChatCompletionRequest, *, access: Access, db_calls: DbCalls, engine: EngineClientProtocol,
    fingerprint: str, disconnected: Callable[[], Awaitable[None]] | None = None,
) -> ChatCompletion | AsyncIterator[str]:
    """Run a chat completion. Errors before generation raise ServiceError; a stream returns payloads."""
    target = await request_target(access, db_calls=db_calls, model=req.model, base_model_id=engine.model_id,
                                  fingerprint=fingerprint, prefixes=req.prefixes,
                                  allow_base_mismatch=req.allow_base_mismatch)
    tools = chat_tools(req)
    prompt_ids = encode_messages(req, engine, tools.template_tools)
    check_prompt(prompt_ids, engine, param="messages")
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = completion_budget(len(prompt_ids), req.completion_limit, target, engine.context_length,
                                   param=param)
    params = sampling_params(req, candidates=req.n, max_tokens=max_tokens,
                             logprobs=(req.top_logprobs or 0) if req.logprobs else None, vocab_size=engine.vocab_size,
                             structured=one_constraint(tools, structured_output(req)))
    gen = await start_generation(engine, requests=[(prompt_ids, p) for p in params], prompt_tokens=len(prompt_ids),
                                 target=target, disconnected=disconnected)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        gen.stop_watching()
        head = ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[])
        return _stream(req, gen, head, engine, len(prompt_ids), tools)
    per_choice = await collect(gen)
    choices = []
    for i, events in enumerate(per_choice):
        message, reason = assistant_message(tools, "".join(ev.text for ev in events), events[-1].finish_reason)
        choices.append(ChatChoice(index=i, message=message,
                                  logprobs=chat_logprobs(engine, events) if req.logprobs else None,
                                  finish_reason=reason))  # type: ignore[arg-type]
    completion_tokens = sum(events[-1].completion_tokens for events in per_choice)
    return ChatCompletion(id=rid, created=created, model=req.model, choices=choices,
                          usage=Usage.of(len(prompt_ids), completion_tokens))


async def _stream(req: ChatCompletionRequest, gen: Generation, head: ChatCompletionChunk,
                  engine: EngineClientProtocol, prompt_tokens: int, tools: ChatTools) -> AsyncIterator[str]:
    """Chunk payloads: each choice's role first, then content deltas, its finish; usage if asked (and in every
    chunk with continuous_usage_stats: that choice's so far); [DONE]."""
    exclude = None if req.include_usage else {"usage"}
    streams = [ToolStream(tools) for _ in range(gen.n)] if tools.mode != "none" else None
    generated = [0] * gen.n  # tokens of each choice so far

    def chunk(choice: ChunkChoice) -> str:
        usage = Usage.of(prompt_tokens, generated[choice.index]) if req.continuous_usage else None
        return head.model_copy(update={"choices": [choice], "usage": usage}).model_dump_json(exclude=exclude)

    try:
        for i in range(gen.n):
            yield chunk(ChunkChoice(index=i, delta=Delta(role="assistant", content="")))
        async for index, ev in gen.events():
            generated[index] = ev.completion_tokens
            content, calls, reason = (streams[index].step(ev.text, ev.final, ev.finish_reason) if streams
                                      else (ev.text or None, [], ev.finish_reason))
            if not (content or calls or ev.final or req.logprobs):
                continue
            yield chunk(ChunkChoice(index=index, delta=Delta(content=content, tool_calls=calls or None),
                                    logprobs=chat_logprobs(engine, [ev]) if req.logprobs else None,
                                    finish_reason=reason))  # type: ignore[arg-type]
        if req.include_usage:
            usage = Usage.of(prompt_tokens, sum(generated))
            yield head.model_copy(update={"usage": usage}).model_dump_json()
    except ServiceError as exc:
        yield error_payload(exc)
    finally:
        gen.close()
    yield "[DONE]"
