"""Training data: JSONL parsing, per-record validation, and tokenization with the loss mask.

Torch-free: the HTTP layer validates uploads and job requests with it, and the tokenizer object is passed in.

Record forms (one JSON object per non-blank line of a file, or one element of a users-API request):

- `{"prompt": str, "completion": str}`, both non-empty: the prompt is encoded exactly as `POST /v1/completions`
  encodes it (`tokenizer.encode(prompt)`, special tokens included), the completion without special tokens and
  followed by EOS; the loss is on the completion and the EOS.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: the same message shapes `POST /v1/chat/completions`
  accepts (roles system, developer (= system), user, assistant; content a string or a list of text parts; `name`
  is ignored as the chat endpoint ignores it), rendered with the model's chat template exactly as the chat
  endpoint renders a request. The loss is on every assistant turn's tokens up to and including its end-of-turn
  (EOS) token. An assistant message may carry OpenAI's `"weight": 0` (or 1) to be kept as context but not
  trained on; at least one assistant turn must be trained on.

Other top-level keys of a record are ignored (files often carry ids or metadata). Unknown keys inside a message
are refused: tool calls and similar features would silently train something else than what the client meant.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from app.jobs.types import TokenizedExample, TrainingDataError

ROLES = frozenset({"system", "developer", "user", "assistant"})
MESSAGE_KEYS = frozenset({"role", "content", "name", "weight"})


class ChatTokenizer(Protocol):
    """What tokenization needs of a (Hugging Face) tokenizer."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


# --- parsing and validation ---------------------------------------------------------------------------------


def parse_jsonl(data: bytes, *, max_examples: int) -> list[dict[str, Any]]:
    """Every record of a JSONL file, validated and normalized (see `validate_record`).

    Raises TrainingDataError naming the 1-based line: not UTF-8, invalid JSON, not an object, a bad field,
    more than `max_examples` records; or (no line) an empty file.
    """
    return [record for _, record in parse_jsonl_numbered(data, max_examples=max_examples)]


def parse_jsonl_numbered(data: bytes, *, max_examples: int) -> list[tuple[int, dict[str, Any]]]:
    """`parse_jsonl` with each record's 1-based line number (blank lines are skipped but counted)."""
    out: list[tuple[int, dict[str, Any]]] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as some editors write
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TrainingDataError(f"not valid UTF-8 (byte {exc.start + 1} of the line)", line=number) from None
        if not text.strip():
            continue
        if len(out) == max_examples:
            raise TrainingDataError(f"too many examples: at most {max_examples} are accepted", line=number)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrainingDataError(f"invalid JSON: {exc.msg} (column {exc.colno})", line=number) from None
        except RecursionError:  # e.g. `[[[[...` 100k deep: the decoder recurses per level
            raise TrainingDataError("invalid JSON: nested too deeply", line=number) from None
        out.append((number, validate_record(obj, line=number)))
    if not out:
        raise TrainingDataError("the file has no examples (it is empty or only blank lines)")
    return out


def validate_record(obj: object, line: int | None = None) -> dict[str, Any]:
    """Check one example and return its normalized form.

    Normalized: `{"prompt": str, "completion": str}` or `{"messages": [{"role", "content": str,
    "weight": 0|1}, ...]}` with `developer` turned into `system`, text parts joined, and `weight` set on
    every message (1 on assistant turns unless given, 0 elsewhere). Raises TrainingDataError with `line`.
    """
    if not isinstance(obj, dict):
        raise TrainingDataError(f"expected a JSON object, found {_json_type(obj)}", line=line)
    has_pc = "prompt" in obj or "completion" in obj
    if has_pc and "messages" in obj:
        raise TrainingDataError("use either `prompt`/`completion` or `messages`, not both", line=line)
    if has_pc:
        return {"prompt": _text_field(obj, "prompt", line), "completion": _text_field(obj, "completion", line)}
    if "messages" in obj:
        return {"messages": _messages(obj["messages"], line)}
    raise TrainingDataError("expected `prompt` and `completion`, or `messages`", line=line)


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _text_field(obj: Mapping[str, object], key: str, line: int | None) -> str:
    if key not in obj:
        raise TrainingDataError(f"missing `{key}`", line=line)
    value = obj[key]
    if not isinstance(value, str):
        raise TrainingDataError(f"`{key}` must be a string, found {_json_type(value)}", line=line)
    if not value:
        raise TrainingDataError(f"`{key}` is empty", line=line)
    return value


def _messages(value: object, line: int | None) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise TrainingDataError("`messages` must be a non-empty array", line=line)
    out = [_message(m, i, line) for i, m in enumerate(value)]
    trained = [i for i, m in enumerate(out) if m["weight"]]
    if not trained:
        raise TrainingDataError("`messages` has no assistant turn to train on", line=line)
    if trained[0] == 0:
        # Serving needs at least one message before the reply (the chat endpoint refuses an empty list).
        raise TrainingDataError("messages[0]: an assistant turn needs at least one message before it", line=line)
    return out


def _message(m: object, i: int, line: int | None) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise TrainingDataError(f"{where} must be an object, found {_json_type(m)}", line=line)
    unknown = sorted(set(m) - MESSAGE_KEYS)
    if unknown:
        raise TrainingDataError(f"{where} has unsupported keys {unknown} (text messages only)", line=line)
    role = m.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise TrainingDataError(
            f"{where}.role must be one of {sorted(ROLES)}, found {json.dumps(role)[:40]}", line=line)
    content = _content(m.get("content"), where, line)
    weight = m.get("weight", 1 if role == "assistant" else 0)
    if type(weight) is not int or weight not in (0, 1):
        raise TrainingDataError(f"{where}.weight must be 0 or 1", line=line)
    if weight and role != "assistant":
        raise TrainingDataError(f"{where}.weight: only assistant messages are trained on", line=line)
    if weight and not content:
        raise TrainingDataError(f"{where}.content is empty (an assistant turn to train on needs text)", line=line)
    return {"role": "system" if role == "developer" else role, "content": content, "weight": weight}


def _content(value: object, where: str, line: int | None) -> str:
    """A string, or OpenAI's list of text parts joined (as the chat endpoint does)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
    ):
        return "".join(p["text"] for p in value)
    raise TrainingDataError(f"{where}.content must be a string or a list of text parts", line=line)


# --- tokenization -------------------------------------------------------------------------------------------


def tokenize_examples(
    records: Sequence[Mapping[str, Any]], tokenizer: ChatTokenizer, *, max_tokens: int,
    lines: Sequence[int] | None = None,
) -> list[TokenizedExample]:
    """Token ids and loss masks of validated records (raw records are validated again, cheaply).

    max_tokens: the longest sequence accepted (the context length minus the prefix's virtual tokens).
    lines: each record's 1-based line for error messages (default: its position, 1-based).
    Raises TrainingDataError naming the line: too long, nothing to train on, a chat template that cannot be
    rendered incrementally.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TrainingDataError("the tokenizer has no EOS token: completions cannot be trained to end")
    out = []
    for i, raw in enumerate(records):
        line = lines[i] if lines is not None else i + 1
        record = validate_record(dict(raw), line=line)
        if "messages" in record:
            example = _tokenize_chat(record["messages"], tokenizer, eos, line)
        else:
            example = _tokenize_completion(record["prompt"], record["completion"], tokenizer, eos)
        if len(example.input_ids) > max_tokens:
            raise TrainingDataError(
                f"the example has {len(example.input_ids)} tokens; at most {max_tokens} fit (the model's context "
                "length minus the prefix's virtual tokens)", line=line)
        out.append(example)
    return out


def _tokenize_completion(prompt: str, completion: str, tokenizer: ChatTokenizer, eos: int) -> TokenizedExample:
    # The prompt as the completions endpoint encodes it (EngineClient.encode_prompt: special tokens included);
    # the completion as the model will generate it after that prompt: plain tokens, then EOS to stop.
    prompt_ids = [int(t) for t in tokenizer.encode(prompt)]
    target = [int(t) for t in tokenizer.encode(completion, add_special_tokens=False)] + [eos]
    return TokenizedExample(input_ids=prompt_ids + target, loss_mask=[False] * len(prompt_ids) + [True] * len(target))


def render_chat(tokenizer: ChatTokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool
                ) -> list[int]:
    """The chat template's token ids; the same call as app.engine.client.EngineClient.encode_chat."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in recent transformers
        out = out["input_ids"]
    return [int(t) for t in out]


def _tokenize_chat(messages: list[dict[str, Any]], tokenizer: ChatTokenizer, eos: int, line: int
                   ) -> TokenizedExample:
    """Render the whole conversation once; each trained assistant turn i is the span between the rendering
    of messages[:i] with the generation prompt (what the chat endpoint feeds the model when serving that
    turn) and the rendering of messages[:i+1], cut after its first EOS (the engine stops there)."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = _render_checked(tokenizer, plain, False, line)
    mask = [False] * len(full)
    for i, m in enumerate(messages):
        if not m["weight"]:
            continue
        start = len(_render_prefix_of(full, tokenizer, plain[:i], True, line, i))
        end = len(_render_prefix_of(full, tokenizer, plain[: i + 1], False, line, i))
        if end <= start:
            raise TrainingDataError(f"messages[{i}]: the chat template renders the assistant turn as nothing",
                                    line=line)
        span = full[start:end]
        if eos in span:
            end = start + span.index(eos) + 1
        mask[start:end] = [True] * (end - start)
    return TokenizedExample(input_ids=full, loss_mask=mask)


def _render_checked(tokenizer: ChatTokenizer, messages: list[dict[str, str]], gen: bool, line: int) -> list[int]:
    try:
        return render_chat(tokenizer, messages, add_generation_prompt=gen)
    except Exception as exc:  # jinja2 TemplateError subclasses, and templates' own raise_exception
        raise TrainingDataError(f"the model's chat template refused the messages: {exc}", line=line) from None


def _render_prefix_of(full: list[int], tokenizer: ChatTokenizer, messages: list[dict[str, str]], gen: bool,
                      line: int, turn: int) -> list[int]:
    ids = _render_checked(tokenizer, messages, gen, line)
    if full[: len(ids)] != ids:
        what = "the prompt before" if gen else "the conversation up to"
        raise TrainingDataError(
            f"messages[{turn}]: the model's chat template renders {what} this assistant turn differently from the "
            "whole conversation (it is not incremental), so the turn's tokens cannot be located; train on "
            "conversations that end with this turn instead", line=line)
    return ids
