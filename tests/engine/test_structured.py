"""Structured outputs in the running engine (random:tiny-llama, its byte tokenizer): every constrained output
parses and validates against its schema, matches its regex, is one of its choices or follows its grammar; a
constraint touches only its own row; a complete grammar ends the row with "stop", a short budget with "length"."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import threading
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest

from app.engine.client import EngineClient
from app.engine.factory import context_length
from app.engine.protocol import Priority, SamplingParams, StructuredOutput, StructuredOutputError
from app.engine.structured import COMPILE_THREADS
from app.engine.types import TokenEvent
from tests.engine.helpers import StepProbe, make_engine, until
from tests.engine.structured_corpus import SCHEMAS

PROMPT = "Answer in JSON:"
# Room for the default whitespace: a greedy random model fills every gap between JSON tokens (20 characters).
GREEDY = SamplingParams(max_tokens=600, temperature=0.0)


def schema_of(schema: object, whitespace: str | None = None) -> StructuredOutput:
    return StructuredOutput("json_schema", json.dumps(schema, separators=(",", ":")), whitespace)


@pytest.fixture
async def client(tiny_llama) -> AsyncIterator[EngineClient]:  # type: ignore[no-untyped-def]
    engine = make_engine(tiny_llama)
    try:
        yield EngineClient(engine, tiny_llama.tokenizer, None, "tiny", context_length(tiny_llama))
    finally:
        engine.stop()


async def run(client: EngineClient, sampling: SamplingParams, prompt: str = PROMPT,
              priority: Priority = "interactive") -> tuple[list[int], str, TokenEvent]:
    tokens, text, final = [], "", None
    async for ev in client.generate(prompt_ids=client.encode_prompt(prompt), sampling=sampling, priority=priority):
        if ev.token_id is not None:
            tokens.append(ev.token_id)
        text += ev.text
        final = ev
    assert final is not None and final.final
    return tokens, text, final


async def test_every_output_validates_against_its_schema(client: EngineClient) -> None:
    """The corpus, compact (greedy and seeded) and with the default whitespace (seeded: greedy, the random model
    fills every gap with whitespace, which only costs time): all in one batch."""
    variants = (("", 0.0, None), ("", 1.0, 7), (None, 1.0, 7))
    cases = [(name, dataclasses.replace(GREEDY, structured=schema_of(schema, ws), temperature=temp, seed=seed))
             for name, schema in SCHEMAS.items() for ws, temp, seed in variants]
    results = await asyncio.gather(*[run(client, params) for _, params in cases])
    for (name, params), (_, text, final) in zip(cases, results, strict=True):
        assert final.finish_reason == "stop", (name, params, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    assert client.structured.compiled == len(SCHEMAS) * 2  # one compilation per schema and whitespace rule


async def test_regex_choice_and_grammar(client: EngineClient) -> None:
    regex = StructuredOutput("regex", r"[0-9]{3}-[a-z]{2,4}")
    choice = StructuredOutput("choice", json.dumps(["yes", "no", "maybe so"]))
    gbnf = StructuredOutput("grammar", 'root ::= "(" ("a" | "b")+ ")"')
    lark = StructuredOutput("grammar", 'start: "x" NUM\nNUM: /[0-9]{1,3}/')
    for so, check in [(regex, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
                      (choice, lambda t: t in ("yes", "no", "maybe so")),
                      (gbnf, lambda t: re.fullmatch(r"\((a|b)+\)", t)),
                      (lark, lambda t: re.fullmatch(r"x[0-9]{1,3}", t))]:
        for seed in (1, 2):
            _, text, final = await run(client, SamplingParams(max_tokens=40, temperature=1.0, seed=seed,
                                                              structured=so))
            assert final.finish_reason == "stop" and check(text), (so, text)


async def test_a_constraint_never_touches_its_neighbours(client: EngineClient) -> None:
    """An unconstrained greedy row gives the same tokens next to constrained rows as alone; a constrained row
    (greedy, and seeded) gives the same tokens alone and in the batch."""
    free = dataclasses.replace(GREEDY, max_tokens=24, ignore_eos=True)
    json_greedy = dataclasses.replace(GREEDY, structured=schema_of(SCHEMAS["nested_objects"], ""))
    json_seeded = dataclasses.replace(json_greedy, temperature=1.0, seed=3)
    regex = dataclasses.replace(GREEDY, max_tokens=24, structured=StructuredOutput("regex", "[a-c]{5,20}"))
    alone = [await run(client, p) for p in (free, json_greedy, json_seeded)]
    probe = StepProbe(client.engine)
    together = await asyncio.gather(*[run(client, p) for p in (free, json_greedy, json_seeded, regex, regex)])
    assert [r[0] for r in together[:3]] == [r[0] for r in alone]
    assert max(len(ids) for ids in probe.decodes) >= 4  # the rows really decoded together
    assert alone[0][0] != together[3][0]  # the unconstrained row is not the regex's output


async def test_running_out_of_tokens_is_length_and_may_be_truncated(client: EngineClient) -> None:
    params = dataclasses.replace(GREEDY, max_tokens=5, structured=schema_of(SCHEMAS["required_fields"], ""))
    tokens, text, final = await run(client, params)
    assert final.finish_reason == "length" and len(tokens) == 5
    assert text.startswith('{"') and not text.endswith("}")  # a prefix of a valid document, not one


async def test_a_complete_grammar_stops_even_with_ignore_eos_and_min_tokens(client: EngineClient) -> None:
    """The grammar wins: min_tokens cannot hold the row open past a complete document, nor ignore_eos."""
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True, min_tokens=40,
                            structured=StructuredOutput("choice", json.dumps(["abc"])))
    tokens, text, final = await run(client, params)
    assert (text, final.finish_reason) == ("abc", "stop") and len(tokens) <= 4


@pytest.mark.parametrize(("so", "fragment"), [
    (StructuredOutput("json_schema", '{"type":"foo"}', param="response_format"), "foo"),
    (StructuredOutput("json_schema", '{"type":"object","properties":{"a":{"$ref":"#/nope"}}}'), "nope"),
    (StructuredOutput("json_schema", "[1]"), "object"),
    (StructuredOutput("regex", "a{3", param="guided_regex"), "a{3"),
    (StructuredOutput("grammar", "start: foo"), "foo"),
    (StructuredOutput("grammar", "this is not a grammar"), "grammar"),
])
async def test_an_invalid_constraint_raises_naming_its_field(client: EngineClient, so: StructuredOutput,
                                                            fragment: str) -> None:
    with pytest.raises(StructuredOutputError) as err:
        await run(client, dataclasses.replace(GREEDY, structured=so))
    assert err.value.param == so.param and fragment in str(err.value)
    assert client.engine.stats.prefills == 0  # refused before it reached the engine


async def test_compiled_grammars_are_cached_lru(client: EngineClient) -> None:
    compiler = client.structured
    compiler._cache_size = 2
    a, b, c = (StructuredOutput("regex", r) for r in ("a+", "b+", "c+"))
    for so in (a, a, b, dataclasses.replace(a, param="guided_regex")):  # param is not part of the key
        await compiler.row_grammar(so)
    assert compiler.compiled == 2
    await compiler.row_grammar(c)  # evicts b, the least recently used
    await compiler.row_grammar(a)
    assert compiler.compiled == 3
    await compiler.row_grammar(b)
    assert compiler.compiled == 4


async def test_a_burst_of_new_constraints_compiles_on_a_few_threads(client: EngineClient) -> None:
    """200 requests with 200 different constraints at once: each is compiled, never more than COMPILE_THREADS at a
    time (a thread per request would be 200 threads)."""
    compiler = client.structured
    running, peak, lock = 0, 0, threading.Lock()
    compile_one = compiler.compile

    def counted(so: StructuredOutput) -> Any:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return compile_one(so)
        finally:
            with lock:
                running -= 1

    compiler.compile = counted  # type: ignore[method-assign]
    grammars = await asyncio.gather(*(compiler.row_grammar(StructuredOutput("regex", f"x{i}[a-z]+"))
                                      for i in range(200)))
    assert len(grammars) == 200 and compiler.compiled == 200
    assert 1 <= peak <= COMPILE_THREADS


async def test_a_preempted_constrained_row_restarts_its_grammar(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    """A batch row taken out of the batch by an interactive request is prefilled again from its start: its
    grammar starts again too (else the rerun would end early, its grammar already part-way through)."""
    engine = make_engine(tiny_llama, max_batch_rows=2)
    client = EngineClient(engine, tiny_llama.tokenizer, None, "tiny", context_length(tiny_llama))
    exactly_20 = [SamplingParams(max_tokens=30, temperature=0.9, seed=seed,
                                 structured=StructuredOutput("regex", "[a-c]{20}")) for seed in (1, 2)]
    probe = StepProbe(engine)
    probe.hold(min_rows=2)  # the two batch rows may be prefilled a step apart: hold once both decode
    try:
        batch = [asyncio.create_task(run(client, p, priority="batch")) for p in exactly_20]
        await until(lambda: probe.decoding.is_set() and len(probe.decodes[-1]) == 2, "both batch rows decoding")
        interactive = asyncio.create_task(run(client, SamplingParams(max_tokens=3, temperature=0.0)))
        await until(lambda: engine.stats.waiting == 1, "the interactive request queued")
        probe.release()
        await interactive
        assert engine.stats.preempted == 1
        for params, (tokens, text, final) in zip(exactly_20, await asyncio.gather(*batch), strict=True):
            assert re.fullmatch("[a-c]{20}", text) and final.finish_reason == "stop", text
            assert tokens == (await run(client, params))[0]  # as alone
    finally:
        probe.release()
        engine.stop()
