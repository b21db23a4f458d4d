"""The admission policy on its own: first come, first served within the row and token budgets."""

from __future__ import annotations

from collections import deque

from app.engine.admission import EngineLimits, admit


class _Request:
    def __init__(self, prompt_len: int) -> None:
        self.prompt_ids = [1] * prompt_len


class _Req:
    def __init__(self, name: str, budget: int, prefix_len: int = 0, prompt_len: int = 1) -> None:
        self.name, self.budget_tokens, self.prefix_len = name, budget, prefix_len
        self.request = _Request(prompt_len)


def _names(reqs: list) -> list[str]:  # type: ignore[type-arg]
    return [r.name for r in reqs]


def test_admits_in_order_within_both_budgets_and_never_lets_a_later_request_overtake() -> None:
    ready = deque([_Req("a", 40), _Req("b", 40), _Req("c", 10), _Req("d", 10)])
    admitted, too_large = admit(ready, rows=1, reserved_tokens=10,  # type: ignore[arg-type]
                                limits=EngineLimits(max_batch_rows=4, max_batch_tokens=100))
    # a fits (50), b would make 90 ≤ 100 -> fits; c would make 100 -> fits, but rows: 1 + 3 = 4 is the limit
    assert _names(admitted) == ["a", "b", "c"] and too_large == [] and _names(list(ready)) == ["d"]

    ready = deque([_Req("big", 80), _Req("small", 5)])
    admitted, _ = admit(ready, rows=1, reserved_tokens=30,  # type: ignore[arg-type]
                        limits=EngineLimits(max_batch_rows=8, max_batch_tokens=100))
    assert admitted == [] and _names(list(ready)) == ["big", "small"]  # small waits behind big


def test_a_request_that_can_never_fit_is_handed_back_as_too_large() -> None:
    ready = deque([_Req("huge", 500), _Req("ok", 50)])
    admitted, too_large = admit(ready, rows=0, reserved_tokens=0,  # type: ignore[arg-type]
                                limits=EngineLimits(max_batch_rows=8, max_batch_tokens=100))
    assert [r.name for r, _ in too_large] == ["huge"] and _names(admitted) == ["ok"] and not ready
    assert "token budget" in too_large[0][1]


def test_prefix_plus_prompt_beyond_the_context_is_refused_once_the_prefix_is_known() -> None:
    ready = deque([_Req("long", 40, prefix_len=20, prompt_len=12), _Req("fits", 40, prefix_len=20, prompt_len=11)])
    admitted, refused = admit(ready, rows=0, reserved_tokens=0,  # type: ignore[arg-type]
                              limits=EngineLimits(max_positions=32))
    assert [r.name for r, _ in refused] == ["long"] and _names(admitted) == ["fits"]
    assert "context of 32 positions" in refused[0][1]
