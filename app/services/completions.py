"""Serving `POST /v1/completions`: request → engine requests → a Completion or a stream of chunk payloads."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from app.engine.protocol import EngineClientProtocol, TokenEvent
from app.errors import ServiceError
from app.protocol.common import Usage, normalize_stop
from app.protocol.completions import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from app.services.access import Access
from app.services.db_calls import DbCalls
from app.services.inference import (
    Generation,
    check_prompt,
    collect,
    completion_budget,
    error_payload,
    request_target,
    sampling_params,
    start_generation,
)
from app.services.structured import structured_output


class CompletionLogprobsBuilder:
    """Accumulates OpenAI's legacy logprobs (tokens, token_logprobs, top_logprobs, text_offset)."""

    def __init__(self, engine: EngineClientProtocol, k: int) -> None:
        self.engine = engine
        self.k = k
        self.offset = 0

    def add(self, events: list[TokenEvent]) -> CompletionLogprobs:
        """The logprobs of `events`' tokens (events without a token are skipped)."""
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[] if self.k else None,
                                 text_offset=[])
        for ev in events:
            if ev.token_id is None:
                continue
            token = self.engine.token_text(ev.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(ev.logprob)
            if out.top_logprobs is not None:
                out.top_logprobs.append({self.engine.token_text(t): lp for t, lp in ev.top_logprobs})
            out.text_offset.append(self.offset)
            self.offset += len(token)
        return out


async def serve_completion(
    req: CompletionRequest, *, access: Access, db_calls: DbCalls, engine: EngineClientProtocol,
    fingerprint: str, disconnected: Callable[[], Awaitable[None]] | None = None,
) -> Completion | AsyncIterator[str]:
    """Run a completion. Errors before generation starts raise ServiceError; streaming returns payloads."""
    target = await request_target(access, db_calls=db_calls, model=req.model, base_model_id=engine.model_id,
                                  fingerprint=fingerprint)
    prompt_ids = engine.encode_prompt(req.prompt)  # type: ignore[arg-type]  # normalized by the validator
    check_prompt(prompt_ids, engine, param="prompt")
    max_tokens = completion_budget(len(prompt_ids), req.max_tokens, target, engine.context_length,
                                   param="max_tokens")
    params = sampling_params(n=req.n, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                             seed=req.seed, stop=normalize_stop(req.stop), logprobs=req.logprobs,
                             ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                             structured=structured_output(req))
    gen = await start_generation(engine, prompt_ids=prompt_ids, params=params, target=target,
                                 disconnected=disconnected)
    head = Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=req.model, choices=[])
    if req.stream:
        gen.stop_watching()
        return _stream(req, gen, head, engine, len(prompt_ids))
    per_choice = await collect(gen)
    choices = []
    for i, events in enumerate(per_choice):
        logprobs = (CompletionLogprobsBuilder(engine, req.logprobs).add(events)
                    if req.logprobs is not None else None)
        choices.append(CompletionChoice(index=i, text="".join(ev.text for ev in events), logprobs=logprobs,
                                        finish_reason=events[-1].finish_reason))  # type: ignore[arg-type]
    completion_tokens = sum(events[-1].completion_tokens for events in per_choice)
    return head.model_copy(update={"choices": choices, "usage": Usage.of(len(prompt_ids), completion_tokens)})


async def _stream(req: CompletionRequest, gen: Generation, head: Completion, engine: EngineClientProtocol,
                  prompt_tokens: int) -> AsyncIterator[str]:
    """Chunk payloads: one per event that carries text, logprobs or a finish; usage last if asked; [DONE]."""
    exclude = None if req.include_usage else {"usage"}
    builders = [CompletionLogprobsBuilder(engine, req.logprobs) for _ in range(gen.n)] \
        if req.logprobs is not None else None
    completion_tokens = 0
    try:
        async for index, ev in gen.events():
            if not (ev.text or ev.final or builders):
                continue
            if ev.final:
                completion_tokens += ev.completion_tokens
            choice = CompletionChoice(index=index, text=ev.text,
                                      logprobs=builders[index].add([ev]) if builders else None,
                                      finish_reason=ev.finish_reason)  # type: ignore[arg-type]
            yield head.model_copy(update={"choices": [choice]}).model_dump_json(exclude=exclude)
        if req.include_usage:
            usage = Usage.of(prompt_tokens, completion_tokens)
            yield head.model_copy(update={"usage": usage}).model_dump_json()
    except ServiceError as exc:
        yield error_payload(exc)
    finally:
        gen.close()
    yield "[DONE]"
