"""Training data: JSONL parsing and validation (line numbers in every error), normalization, and tokenization
with loss masks, on the byte tokenizer of the tiny random models and on the embedded SmolLM2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from app.engine.byte_tokenizer import build_byte_tokenizer
from app.engine.client import EngineClient
from app.engine.gguf_cache import embedded_gguf_path, ensure_converted
from app.jobs.data import parse_jsonl, parse_jsonl_numbered, tokenize_examples, validate_record
from app.jobs.types import TrainingDataError

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "See you"}]}
PC = {"prompt": "name: Aria | food: thai =>", "completion": " Aria serves thai food."}


@pytest.fixture(scope="module")
def byte_tok() -> PreTrainedTokenizerBase:
    """The tiny random models' tokenizer: one token per byte, ChatML template, eos <|im_end|>."""
    return build_byte_tokenizer(512, 256)


@pytest.fixture(scope="module")
def smol_tok(embedded_data_dir: Path) -> PreTrainedTokenizerBase:
    """The embedded SmolLM2-135M-Instruct tokenizer (BPE; template adds a default system turn), from the session's
    converted copy of the GGUF (reading the GGUF itself takes ~13 s; the conversion is shared with other tests)."""
    converted = ensure_converted(embedded_gguf_path(), embedded_data_dir)
    return AutoTokenizer.from_pretrained(converted, local_files_only=True)


def jsonl(*records: Any) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def error_of(data: bytes, max_examples: int = 100) -> TrainingDataError:
    with pytest.raises(TrainingDataError) as info:
        parse_jsonl(data, max_examples=max_examples)
    return info.value


# --- parsing ------------------------------------------------------------------------------------------------


def test_parse_both_forms_with_blank_lines_bom_and_ignored_keys() -> None:
    data = b"\xef\xbb\xbf" + jsonl({**PC, "id": 7}) + b"\n  \r\n" + jsonl(CHAT)
    numbered = parse_jsonl_numbered(data, max_examples=2)
    assert [n for n, _ in numbered] == [1, 4]
    pc, chat = (r for _, r in numbered)
    assert pc == PC  # extra top-level keys dropped
    assert [m["weight"] for m in chat["messages"]] == [0, 0, 1, 0, 1]
    assert parse_jsonl(data, max_examples=2) == [pc, chat]


@pytest.mark.parametrize(("data", "line", "fragment"), [
    (b"", None, "no examples"),
    (b"\n \n\t\n", None, "no examples"),
    (jsonl(PC) + b"{not json\n", 2, "invalid JSON"),
    (jsonl(PC, PC) + b"[1, 2]\n", 3, "expected a JSON object, found an array"),
    (jsonl(PC) + b'"text"\n', 2, "found a string"),
    (jsonl(PC) + b"\xff\xfe{}\n", 2, "not valid UTF-8"),
    (jsonl({"prompt": "x"}), 1, "missing `completion`"),
    (jsonl({"completion": "x"}), 1, "missing `prompt`"),
    (jsonl({"prompt": "", "completion": "x"}), 1, "`prompt` is empty"),
    (jsonl({"prompt": "x", "completion": 3}), 1, "`completion` must be a string, found a number"),
    (jsonl({"text": "x"}), 1, "expected `prompt` and `completion`, or `messages`"),
    (jsonl({**PC, "messages": CHAT["messages"]}), 1, "not both"),
    (jsonl({"messages": []}), 1, "non-empty array"),
    (jsonl({"messages": "hi"}), 1, "non-empty array"),
    (jsonl({"messages": ["hi"]}), 1, "messages[0] must be an object"),
    (jsonl({"messages": [{"role": "tool", "content": "x"}]}), 1, "messages[0].role must be one of"),
    (jsonl({"messages": [{"role": "user", "content": 5}]}), 1, "content must be a string or a list of text"),
    (jsonl({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y",
                                                            "tool_calls": []}]}), 1, "unsupported keys"),
    (jsonl({"messages": [{"role": "user", "content": "x"}]}), 1, "no assistant turn to train on"),
    (jsonl({"messages": [{"role": "user", "content": "x"},
                         {"role": "assistant", "content": "y", "weight": 0}]}), 1, "no assistant turn"),
    (jsonl({"messages": [{"role": "user", "content": "x"},
                         {"role": "assistant", "content": "y", "weight": 2}]}), 1, "weight must be 0 or 1"),
    (jsonl({"messages": [{"role": "user", "content": "x", "weight": 1},
                         {"role": "assistant", "content": "y"}]}), 1, "only assistant messages"),
    (jsonl({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}), 1,
     "content is empty"),
    (jsonl({"messages": [{"role": "assistant", "content": "y"}]}), 1, "at least one message before it"),
    (jsonl(PC, PC, PC, PC), 4, "too many examples: at most 3"),
])
def test_bad_files_name_the_line(data: bytes, line: int | None, fragment: str) -> None:
    err = error_of(data, max_examples=3)
    assert err.line == line
    assert fragment in str(err)
    assert str(err).startswith(f"line {line}: ") if line is not None else not str(err).startswith("line")


def test_validate_record_normalizes_chat_shapes() -> None:
    record = validate_record({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "kind."}]},
        {"role": "user", "content": "Hi", "name": "bob"},
        {"role": "assistant", "content": "Old answer", "weight": 0},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "New answer"},
    ]})
    assert record["messages"][0] == {"role": "system", "content": "Be kind.", "weight": 0}
    assert [m["weight"] for m in record["messages"]] == [0, 0, 0, 0, 1]
    assert validate_record(record) == record  # normalized records validate to themselves
    with pytest.raises(TrainingDataError, match=r"^line 4: expected a JSON object, found null"):
        validate_record(None, line=4)


# --- tokenization -------------------------------------------------------------------------------------------


def targets(tok: PreTrainedTokenizerBase, ex: Any) -> list[str]:
    """The trained spans of an example, decoded (consecutive True runs of the loss mask)."""
    spans, current = [], []
    for tid, m in zip(ex.input_ids, ex.loss_mask, strict=True):
        if m:
            current.append(tid)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tok.decode(s) for s in spans]


@pytest.mark.parametrize("which", ["byte_tok", "smol_tok"])
def test_prompt_completion_matches_the_completions_endpoint(which: str, request: pytest.FixtureRequest) -> None:
    tok: PreTrainedTokenizerBase = request.getfixturevalue(which)
    [ex] = tokenize_examples([PC], tok, max_tokens=1000)
    served_prompt = EngineClient.encode_prompt(SimpleNamespace(tokenizer=tok), PC["prompt"])  # type: ignore[arg-type]
    n = len(served_prompt)
    assert ex.input_ids[:n] == served_prompt and not any(ex.loss_mask[:n])
    assert all(ex.loss_mask[n:]) and ex.input_ids[-1] == tok.eos_token_id
    assert ex.input_ids[n:-1] == tok.encode(PC["completion"], add_special_tokens=False)
    assert tok.decode(ex.input_ids[n:]) == PC["completion"] + tok.eos_token


@pytest.mark.parametrize("which", ["byte_tok", "smol_tok"])
def test_chat_trains_each_assistant_turn_through_its_end_token(which: str, request: pytest.FixtureRequest) -> None:
    tok: PreTrainedTokenizerBase = request.getfixturevalue(which)
    [ex] = tokenize_examples([CHAT], tok, max_tokens=1000)
    msgs = [{"role": m["role"], "content": m["content"]} for m in CHAT["messages"]]
    # The whole sequence is the template's rendering; each turn's prompt is what the chat endpoint would send.
    assert ex.input_ids == tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert targets(tok, ex) == ["Hello there<|im_end|>", "See you<|im_end|>"]
    for turn in (2, 4):
        served = EngineClient.encode_chat(SimpleNamespace(tokenizer=tok), msgs[:turn])  # type: ignore[arg-type]
        assert ex.input_ids[: len(served)] == served
        assert not ex.loss_mask[len(served) - 1] and ex.loss_mask[len(served)]
    # The newline after <|im_end|> is never generated (the engine stops at EOS), so it is not a target.
    assert ex.input_ids[-2] == tok.eos_token_id and ex.loss_mask[-2] and not ex.loss_mask[-1]


def test_weight_zero_turns_are_context_only(byte_tok: PreTrainedTokenizerBase) -> None:
    record = json.loads(json.dumps(CHAT))
    record["messages"][2]["weight"] = 0
    [ex] = tokenize_examples([record], byte_tok, max_tokens=1000)
    assert targets(byte_tok, ex) == ["See you<|im_end|>"]


def test_too_long_names_the_line(byte_tok: PreTrainedTokenizerBase) -> None:
    short = {"prompt": "ab", "completion": "cd"}  # 2 + 2 + EOS = 5 byte tokens
    assert len(tokenize_examples([short], byte_tok, max_tokens=5)[0].input_ids) == 5
    with pytest.raises(TrainingDataError, match=r"^line 9: the example has 6 tokens; at most 5 fit"):
        tokenize_examples([short, {"prompt": "abc", "completion": "cd"}], byte_tok, max_tokens=5, lines=[3, 9])
    with pytest.raises(TrainingDataError, match=r"^line 2: "):
        tokenize_examples([short, {"prompt": "abc", "completion": "cd"}], byte_tok, max_tokens=5)


def test_template_without_eos_trains_the_whole_turn(byte_tok: PreTrainedTokenizerBase) -> None:
    tok = build_byte_tokenizer(512, 256)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    [ex] = tokenize_examples([CHAT], tok, max_tokens=1000)
    assert targets(tok, ex) == ["Hello there\n", "See you\n"]


def test_non_incremental_template_is_a_clear_error() -> None:
    tok = build_byte_tokenizer(512, 256)
    # Marks the last message specially: rendering a shorter conversation is not a prefix of the whole.
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                         "{% if loop.last %} (last){% endif %}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(TrainingDataError, match=r"^line 1: messages\[2\]: .*not incremental"):
        tokenize_examples([CHAT], tok, max_tokens=1000)


def test_template_errors_and_missing_eos_are_data_errors() -> None:
    tok = build_byte_tokenizer(512, 256)
    tok.chat_template = "{{ raise_exception('no system messages') }}"
    with pytest.raises(TrainingDataError, match="chat template refused the messages: no system messages"):
        tokenize_examples([CHAT], tok, max_tokens=1000)
    no_eos = SimpleNamespace(eos_token_id=None)
    with pytest.raises(TrainingDataError, match="no EOS token"):
        tokenize_examples([PC], no_eos, max_tokens=1000)  # type: ignore[arg-type]
