"""Serving `POST /v1/completions`: request → engine requests (prompts × n, or × best_of) → a Completion or a
stream of chunk payloads."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from app.engine.protocol import EngineClientProtocol, SamplingParams, TokenEvent
from app.errors import InvalidRequest, ServiceError
from app.protocol.common import MAX_CHOICES, Usage
from app.protocol.completions import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from app.services.access import Access
from app.services.db_calls import DbCalls
from app.services.generation import Generation, collect, error_payload, start_generation
from app.services.sampling_options import sampling_params
from app.services.structured import structured_output
from app.services.targets import ModelTarget, check_prompt, completion_budget, request_target


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


@dataclass(frozen=True)
class _Plan:
    """A request's engine requests: prompt p's candidate c is engine request p * candidates + c."""

    prompts: list[list[int]]
    echo: list[str]  # each prompt's text, put before its choices' text with `echo`
    requests: list[tuple[list[int], SamplingParams]]
    candidates: int

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompts)


def _plan(req: CompletionRequest, engine: EngineClientProtocol, target: ModelTarget) -> _Plan:
    """Encode and check every prompt and build its candidates' sampling (400s name the field)."""
    prompts = req.prompts
    if len(prompts) * req.candidates > MAX_CHOICES:
        raise InvalidRequest(f"prompt: {len(prompts)} prompts x {req.candidates} choices each is more than "
                             f"{MAX_CHOICES} choices in one request", param="prompt")
    ranked = req.candidates > req.n  # best_of ranks candidates by their logprobs: computed even if not asked
    logprobs = req.logprobs if req.logprobs is not None or not ranked else 0
    structured = structured_output(req)
    plan = _Plan([], [], [], req.candidates)
    for prompt in prompts:
        ids = engine.encode_prompt(prompt)
        check_prompt(ids, engine, param="prompt")
        max_tokens = completion_budget(len(ids), req.max_tokens, target, engine.context_length, param="max_tokens")
        params = sampling_params(req, candidates=req.candidates, max_tokens=max_tokens, logprobs=logprobs,
                                 vocab_size=engine.vocab_size, structured=structured)
        plan.prompts.append(ids)
        plan.echo.append((prompt if isinstance(prompt, str) else engine.decode(ids)) if req.echo else "")
        plan.requests.extend((ids, p) for p in params)
    return plan


async def serve_completion(
    req: CompletionRequest, *, access: Access, db_calls: DbCalls, engine: EngineClientProtocol,
    fingerprint: str, disconnected: Callable[[], Awaitable[None]] | None = None,
) -> Completion | AsyncIterator[str]:
    """Run a completion: every prompt x n choices (choice index = prompt index * n + j). Errors before generation
    starts raise ServiceError; streaming returns payloads."""
    target = await request_target(access, db_calls=db_calls, model=req.model, base_model_id=engine.model_id,
                                  fingerprint=fingerprint, prefixes=req.prefixes,
                                  allow_base_mismatch=req.allow_base_mismatch)
    plan = _plan(req, engine, target)
    gen = await start_generation(engine, requests=plan.requests, prompt_tokens=plan.prompt_tokens, target=target,
                                 disconnected=disconnected)
    head = Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=req.model, choices=[])
    if req.stream:
        gen.stop_watching()
        return _stream(req, gen, head, engine, plan)
    per_request = await collect(gen)
    choices = []
    for p in range(len(plan.prompts)):
        candidates = per_request[p * plan.candidates : (p + 1) * plan.candidates]
        for j, events in enumerate(_best(candidates, req.n)):
            logprobs = (CompletionLogprobsBuilder(engine, req.logprobs).add(events)
                        if req.logprobs is not None else None)
            choices.append(CompletionChoice(index=p * req.n + j, text=plan.echo[p] + "".join(ev.text for ev in events),
                                            logprobs=logprobs,
                                            finish_reason=events[-1].finish_reason))  # type: ignore[arg-type]
    completion_tokens = sum(events[-1].completion_tokens for events in per_request)  # every candidate's
    return head.model_copy(update={"choices": choices, "usage": Usage.of(plan.prompt_tokens, completion_tokens)})


def _best(candidates: list[list[TokenEvent]], n: int) -> list[list[TokenEvent]]:
    """The n candidates with the highest mean token logprob (OpenAI's best_of), best first; ties keep their order.
    Without best_of (n candidates), all of them in order."""
    if len(candidates) == n:
        return candidates

    def mean_logprob(events: list[TokenEvent]) -> float:
        lps = [ev.logprob for ev in events if ev.token_id is not None and ev.logprob is not None]
        return sum(lps) / len(lps) if lps else float("-inf")

    return sorted(candidates, key=mean_logprob, reverse=True)[:n]


async def _stream(req: CompletionRequest, gen: Generation, head: Completion, engine: EngineClientProtocol,
                  plan: _Plan) -> AsyncIterator[str]:
    """Chunk payloads: with echo, each choice's prompt first; then one per event that carries text, logprobs or a
    finish; usage last if asked (and in every chunk with continuous_usage_stats); [DONE]. best_of is n here (the
    wire model refuses more with stream), so engine request k is choice k."""
    exclude = None if req.include_usage else {"usage"}
    builders = [CompletionLogprobsBuilder(engine, req.logprobs) for _ in range(gen.n)] \
        if req.logprobs is not None else None
    generated = [0] * gen.n  # tokens of each choice so far

    def chunk(index: int, text: str, logprobs: CompletionLogprobs | None = None,
              finish_reason: str | None = None) -> str:
        usage = (Usage.of(len(plan.prompts[index // req.n]), generated[index]) if req.continuous_usage else None)
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                  finish_reason=finish_reason)  # type: ignore[arg-type]
        return head.model_copy(update={"choices": [choice], "usage": usage}).model_dump_json(exclude=exclude)

    try:
        if req.echo:
            for index in range(gen.n):
                yield chunk(index, plan.echo[index // req.n])
        async for index, ev in gen.events():
            generated[index] = ev.completion_tokens
            if not (ev.text or ev.final or builders):
                continue
            yield chunk(index, ev.text, builders[index].add([ev]) if builders else None, ev.finish_reason)
        if req.include_usage:
            usage = Usage.of(plan.prompt_tokens, sum(generated))
            yield head.model_copy(update={"usage": usage}).model_dump_json()
    except ServiceError as exc:
        yield error_payload(exc)
    finally:
        gen.close()
    yield "[DONE]"
