"""Serving tool calls in chat: what `tools` / `tool_choice` / `parallel_tool_calls` ask, and the model's output
turned into OpenAI's `tool_calls`.

- `none` (the default without tools): the tools are not rendered; the answer is text.
- `auto` (the default with tools): the tools go through the model's chat template (app/engine/tool_template.py)
  and the model writes what it wants; `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in its
  output (the Hermes format of SmolLM2's, Qwen2.5's and Hermes' fine-tunes) become tool calls, the rest content.
- `required`: the output is constrained (a grammar the grammar engine enforces) to one or more of those blocks,
  each `{"name": <a tool's name>, "arguments": <its parameters schema>}` (one with `parallel_tool_calls: false`).
  The format the prompt showed, so the model can end its turn after a call: with vLLM's JSON list of calls the
  embedded SmolLM2 repeated its first call until max_tokens (greedy), with these blocks it stopped after its calls.
- a named function: the output is constrained to that function's arguments (its parameters schema).

A turn with calls ends with `finish_reason: "tool_calls"`. Torch-free.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from app.engine.protocol import StructuredOutput
from app.errors import InvalidRequest
from app.protocol.chat import AssistantMessage
from app.protocol.tools import FunctionCallOut, NamedToolChoice, ToolCall, ToolFields

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"  # app/engine/tool_template.py writes the same
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# A forced call's JSON takes at most one space between tokens (`{"city": "Paris"}`, as models write calls): the
# arguments are data, and a model cannot lose its token budget in whitespace (a random-weight one would).
CALL_WHITESPACE = " ?"


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str


def new_call(name: str, arguments: str) -> ParsedCall:
    return ParsedCall(name, arguments, f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class ChatTools:
    """A chat request's tool settings. `template_tools`: what the chat template gets (None: no tools);
    `mode`: none / auto / required / named; `constraint`: the output's grammar for required and named."""

    template_tools: list[dict[str, Any]] | None
    mode: str
    parallel: bool
    named: str | None = None
    constraint: StructuredOutput | None = None


def _schema_text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)  # key order kept: `name` comes first


def chat_tools(req: ToolFields) -> ChatTools:
    """The request's tool settings; a 400 naming `tools` or `tool_choice` for what cannot be served."""
    tools = req.tools or []
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"tools: function names must be distinct, got {names}", param="tools")
    choice = req.tool_choice or ("auto" if tools else "none")
    parallel = req.parallel_tool_calls is not False
    if choice == "none":
        return ChatTools(None, "none", parallel)
    if not tools:
        raise InvalidRequest(f"tool_choice {choice!r} needs tools", param="tool_choice")
    rendered = [t.model_dump(exclude_none=True) for t in tools]
    if choice == "auto":
        strict = next((i for i, t in enumerate(tools) if t.function.strict), None)
        if strict is not None:  # an `auto` call is the model's own text: nothing would hold it to the schema
            raise InvalidRequest(f"tools[{strict}].function.strict: true is enforced only when tool_choice is "
                                 "\"required\" or names the function; with \"auto\" the model's arguments are "
                                 "not constrained", param=f"tools[{strict}].function.strict")
        return ChatTools(rendered, "auto", parallel)
    params = {t.function.name: t.function.parameters or ANY_OBJECT for t in tools}
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in params:
            raise InvalidRequest(f"tool_choice names function {name!r}, which is not in tools ({', '.join(names)})",
                                 param="tool_choice")
        return ChatTools(rendered, "named", parallel, name,
                         StructuredOutput("json_schema", _schema_text(params[name]), CALL_WHITESPACE, param="tools"))
    call = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                       "properties": {"name": {"const": n}, "arguments": p}} for n, p in params.items()],
            "x-guidance": {"whitespace_pattern": CALL_WHITESPACE}}
    more = ' ("\\n" call)*' if parallel else ""  # Lark: further calls, one per line
    grammar = (f"start: call{more}\n"
               f'call: "{TOOL_CALL_START}\\n" body "\\n{TOOL_CALL_END}"\n'
               f"body: %json {_schema_text(call)}")  # llguidance's Lark takes an inline JSON schema
    return ChatTools(rendered, "required", parallel, None, StructuredOutput("grammar", grammar, param="tools"))


def one_constraint(tools: ChatTools, other: StructuredOutput | None) -> StructuredOutput | None:
    """The output's one constraint: a forced tool call's, or the structured-output fields'; both is a 400."""
    if tools.constraint is not None and other is not None:
        raise InvalidRequest(f"tool_choice {tools.mode!r} constrains the output; it cannot be combined with "
                             f"{other.param}", param="tool_choice")
    return tools.constraint or other


def _call_of(obj: Any) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of one decoded call object, or None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def named_call(tools: ChatTools, text: str) -> list[ParsedCall]:
    """The call of a named turn (its output is the arguments, as streamed: the text itself); [] if cut short."""
    assert tools.named is not None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [new_call(tools.named, text.strip())] if isinstance(value, dict) else []


class HermesParser:
    """Splits an `auto` turn's text, fed piece by piece, into content and `<tool_call>` blocks.

    `feed` returns the content that became final (a tail that may be the start of a `<tool_call>` tag is held
    back) and the calls completed. A block whose body is not a call object stays content; an unterminated one
    is content at `close`. With `parallel` false only the first call counts (later ones are dropped)."""

    def __init__(self, parallel: bool = True) -> None:
        self.parallel = parallel
        self.calls: list[ParsedCall] = []
        self._buf = ""
        self._in_call = False

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        self._buf += text
        content, new = "", []
        while True:
            if self._in_call:
                end = self._buf.find(TOOL_CALL_END)
                if end < 0:
                    break
                body, self._buf, self._in_call = self._buf[:end], self._buf[end + len(TOOL_CALL_END):], False
                call = self._decode(body)
                if call is None:
                    content += TOOL_CALL_START + body + TOOL_CALL_END
                elif self.parallel or not self.calls:
                    self.calls.append(call)
                    new.append(call)
                continue
            start = self._buf.find(TOOL_CALL_START)
            if start < 0:
                keep = next((n for n in range(min(len(TOOL_CALL_START) - 1, len(self._buf)), 0, -1)
                             if self._buf.endswith(TOOL_CALL_START[:n])), 0)
                content, self._buf = content + self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                break
            content, self._buf, self._in_call = (content + self._buf[:start],
                                                 self._buf[start + len(TOOL_CALL_START):], True)
        return content, new

    def close(self) -> str:
        """The text still held (an unterminated block included), as content."""
        rest = (TOOL_CALL_START if self._in_call else "") + self._buf
        self._buf, self._in_call = "", False
        return rest

    @staticmethod
    def _decode(body: str) -> ParsedCall | None:
        try:
            call = _call_of(json.loads(body))
        except json.JSONDecodeError:
            return None
        return new_call(*call) if call is not None else None


def turn_of(tools: ChatTools, text: str, finish_reason: str | None) -> tuple[str | None, list[ParsedCall], str | None]:
    """A whole turn's (content, calls, finish_reason): calls end it with "tool_calls"; content around them is
    trimmed and None when empty."""
    if tools.mode == "named":
        calls = named_call(tools, text) if finish_reason == "stop" else []
        return (None, calls, "tool_calls") if calls else (text, [], finish_reason)
    parser = HermesParser(tools.parallel)
    content, calls = parser.feed(text)
    content += parser.close()
    if not calls:
        return content, [], finish_reason
    return content.strip() or None, calls, "tool_calls"


def assistant_message(tools: ChatTools, text: str, finish_reason: str | None) -> tuple[AssistantMessage, str | None]:
    """A whole choice's message and finish_reason: its text, or (with tools) its content and tool calls."""
    if tools.mode == "none":
        return AssistantMessage(content=text), finish_reason
    content, calls, reason = turn_of(tools, text, finish_reason)
    out = [ToolCall(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls]
    return AssistantMessage(content=content, tool_calls=out or None), reason
