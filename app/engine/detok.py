"""Incremental detokenization with stop strings.

Text is released only when it is final: never half of a multi-byte character (the tokenizer yields U+FFFD
until the bytes are complete), and never a tail that might still grow into a stop string.

With `min_tokens` (vLLM's rule), a stop string ends the text only if it ends after the text of the first
`min_tokens` tokens: one lying wholly inside them stays in the text, one that straddles the boundary counts.
"""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalText:
    """Accumulates generated token ids and returns the newly safe text after each one."""

    def __init__(self, tokenizer: Decoder, stop: tuple[str, ...] = (), min_tokens: int = 0) -> None:
        self._tok = tokenizer
        self._stop = stop
        self._min_tokens = min_tokens
        self._stop_after = 0  # a stop string counts only if it ends past this many chars of text
        self._ids: list[int] = []
        self._prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already in self.text
        self._read_offset = 0
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset]): changes only when the offsets move
        self.text = ""  # all decoded text so far (may include a held-back tail)
        self._emitted = 0  # chars of self.text already released
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly empty). Sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        # Decode with a little left context: many tokenizers render a token differently at the start.
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(self._prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(self._prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        if len(self._ids) <= self._min_tokens:
            self._stop_after = len(self.text)
        return self._release()

    def _release(self) -> str:
        if self._stop:
            # Search from where a stop string could first have become complete, and past the min_tokens text.
            start = max(0, self._emitted - max(len(s) for s in self._stop))
            hits = [i for s in self._stop
                    if (i := self.text.find(s, max(start, self._stop_after - len(s) + 1))) != -1]
            if hits:
                self.stopped = True
                self.text = self.text[: min(hits)]
                return self.flush()
        hold = self._holdback()
        end = len(self.text) - hold
        if end <= self._emitted:
            return ""
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def _holdback(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """Release whatever is left (at the end of generation)."""
        out = self.text[self._emitted :]
        self._emitted = len(self.text)
        return out
