"""Incremental text: multi-byte characters are never split, stop strings are never leaked."""

from __future__ import annotations

import pytest

from app.engine.detok import IncrementalText


class ByteTok:
    """Each id is one byte of UTF-8 (decode replaces incomplete sequences with U+FFFD, like real tokenizers)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _feed(text: str, stop: tuple[str, ...] = (), min_tokens: int = 0) -> tuple[list[str], IncrementalText]:
    inc = IncrementalText(ByteTok(), stop, min_tokens)
    pieces = []
    for b in text.encode():
        pieces.append(inc.add(b))
        if inc.stopped:
            break
    pieces.append(inc.flush())
    return pieces, inc


def test_multibyte_characters_are_released_whole() -> None:
    pieces, _ = _feed("héllo 日本")
    assert "".join(pieces) == "héllo 日本"
    assert all("\ufffd" not in p for p in pieces)
    assert "日" in pieces  # released in one piece once its three bytes arrived


def test_stop_string_is_cut_and_never_emitted() -> None:
    pieces, inc = _feed("answer: 42\n\nQuestion: next", stop=("\n\nQuestion",))
    assert inc.stopped
    assert "".join(pieces) == "answer: 42"
    assert all("\n" not in p for p in pieces)


def test_partial_stop_match_is_held_then_released() -> None:
    inc = IncrementalText(ByteTok(), ("STOP",))
    out = "".join(inc.add(b) for b in b"a ST")
    assert out == "a "  # "ST" could still become "STOP"
    out += "".join(inc.add(b) for b in b"AY")
    assert out == "a STAY" and not inc.stopped


def test_earliest_of_several_stop_strings_wins() -> None:
    pieces, inc = _feed("one two three", stop=("three", "two"))
    assert "".join(pieces) == "one " and inc.stopped


@pytest.mark.parametrize(("min_tokens", "stop", "want"), [
    (0, "c", "ab"),
    (3, "c", "abcab"),  # the first "c" is the 3rd token: inside min_tokens, kept as text
    (5, "c", "abcab"),
    (6, "c", "abcabcab"),
    (2, "bc", "a"),  # starts inside the first 2 tokens, ends after them: it counts (vLLM)
    (3, "bc", "abca"),
    (9, "c", "abcabcabc"),  # min_tokens = every token: no stop string can end the text
])
def test_stop_strings_only_end_past_min_tokens(min_tokens: int, stop: str, want: str) -> None:
    pieces, inc = _feed("abcabcabc", stop=(stop,), min_tokens=min_tokens)
    assert "".join(pieces) == want and inc.stopped == (want != "abcabcabc")
