"""Tools through the model's chat template: what `EngineClient.encode_chat` hands to `apply_chat_template`.

A template that knows tools (it reads `tools`, as Qwen2.5's, Hermes' or Llama 3.1's do) gets them as HF expects:
`tools=[...]` and each assistant tool call's arguments as an object. A template that does not (the embedded
SmolLM2's, the byte tokenizer's ChatML) would drop them silently, so the conversation is rewritten in the Hermes
format those models' fine-tunes and app/services/tools.py's parser use: the tool signatures in the system
message, each call as `<tool_call>{"name": ..., "arguments": ...}</tool_call>` in the assistant's text, each result
as `<tool_response>...</tool_response>` in a user turn. Torch-free.
"""

from __future__ import annotations

import json
from typing import Any

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"

HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, return a "
    "json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def knows_tools(chat_template: Any) -> bool:
    """Whether a chat template renders `tools` itself (it mentions them)."""
    return isinstance(chat_template, str) and "tools" in chat_template


def _arguments(text: str) -> Any:
    """A tool call's arguments (JSON text, as OpenAI sends them) as an object; text that is not JSON stays text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def call_text(name: str, arguments: Any) -> str:
    """One call as the Hermes format writes it."""
    return f"{TOOL_CALL_START}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n" \
           f"{TOOL_CALL_END}"


def native_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that knows tools: tool calls' arguments as objects (HF's convention)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"type": "function", "id": c["id"],
                      "function": {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}}
                     for c in m["tool_calls"]]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def hermes_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Messages for a template that knows no tools: plain role/content turns in the Hermes format."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = "\n".join(call_text(c["function"]["name"], _arguments(c["function"]["arguments"]))
                              for c in m["tool_calls"])
            text = m.get("content") or ""
            out.append({"role": m["role"], "content": f"{text}\n{calls}" if text else calls})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    if tools:
        system = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out
