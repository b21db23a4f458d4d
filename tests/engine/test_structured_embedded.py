"""Structured outputs on the embedded SmolLM2 (its 49152-token BPE tokenizer, as served): a chat asked for JSON
gives a document that validates against its schema, greedy and seeded, in one batch."""

from __future__ import annotations

import asyncio
import json

import jsonschema

from app.engine.client import EngineClient
from app.engine.factory import context_length
from app.engine.protocol import SamplingParams, StructuredOutput
from tests.engine.helpers import make_engine

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population"],
          "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
                         "population": {"type": "integer", "minimum": 0, "maximum": 99999999}}}


async def test_embedded_model_json_follows_the_schema(embedded_model) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(embedded_model)
    client = EngineClient(engine, embedded_model.tokenizer, None, "smol", context_length(embedded_model))
    so = StructuredOutput("json_schema", json.dumps(SCHEMA))
    prompt = client.encode_chat([{"role": "user", "content": "Give the capital of France as JSON."}])

    async def run(params: SamplingParams) -> tuple[str, str | None]:
        text, reason = "", None
        async for ev in client.generate(prompt_ids=prompt, sampling=params):
            text, reason = text + ev.text, ev.finish_reason
        return text, reason

    try:
        results = await asyncio.gather(run(SamplingParams(max_tokens=80, temperature=0.0, structured=so)),
                                       run(SamplingParams(max_tokens=80, temperature=0.8, seed=5, structured=so)))
    finally:
        engine.stop()
    for text, reason in results:
        assert reason == "stop", repr(text)
        jsonschema.validate(json.loads(text), SCHEMA)
