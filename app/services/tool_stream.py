"""One streamed chat choice under tools: each engine event's text as content and tool-call deltas, OpenAI's way.

- `auto` and `required` (both `<tool_call>` blocks): content streams as it comes (a tail that may open a
  `<tool_call>` tag waits for the next piece, and trailing whitespace waits for more text, so the whitespace
  around calls is not sent); each call goes out whole in one delta (index, id, type, name and arguments) once
  its block closes.
- named: the call's first delta carries id, type and name with empty arguments; the arguments then stream
  piece by piece.

The choice ends with "tool_calls" when it made calls. Torch-free.
"""

from __future__ import annotations

from app.protocol.tools import DeltaFunctionCall, DeltaToolCall
from app.services.tools import ChatTools, HermesParser, ParsedCall, new_call


def _delta(index: int, call: ParsedCall) -> DeltaToolCall:
    return DeltaToolCall(index=index, id=call.id, type="function",
                         function=DeltaFunctionCall(name=call.name, arguments=call.arguments))


class ToolStream:
    """Turns one choice's events into (content, tool-call deltas, finish_reason) for its chunks."""

    def __init__(self, tools: ChatTools) -> None:
        self.tools = tools
        self.calls = 0
        self._parser = HermesParser(tools.parallel)
        self._space = ""  # whitespace held until text follows it

    def step(self, text: str, final: bool, finish_reason: str | None
             ) -> tuple[str | None, list[DeltaToolCall], str | None]:
        if self.tools.mode == "named":
            return self._named(text, finish_reason)
        content, calls = self._parser.feed(text)
        if final:
            content += self._parser.close()
        deltas = [_delta(self.calls + i, c) for i, c in enumerate(calls)]
        self.calls += len(calls)
        body = content.rstrip()  # trailing whitespace waits: it may be what separates text from a call
        content, self._space = ((self._space + body, content[len(body):]) if body
                                else ("", self._space + content))
        if final and not self.calls:
            content, self._space = content + self._space, ""
        return content or None, deltas, ("tool_calls" if final and self.calls else finish_reason)

    def _named(self, text: str, finish_reason: str | None) -> tuple[str | None, list[DeltaToolCall], str | None]:
        deltas = []
        if self.calls == 0:
            assert self.tools.named is not None
            self.calls = 1
            deltas.append(_delta(0, new_call(self.tools.named, "")))
        if text:
            deltas.append(DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text)))
        return None, deltas, ("tool_calls" if finish_reason == "stop" else finish_reason)
