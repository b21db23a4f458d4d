"""The admission policy on its own: first come, first served within the row and token budgets."""

from __future__ import annotations

from collections import deque

from app.engine.admission import EngineLimits, admit


class _Req:
    def __init__(self, name: str, budget: int) -> None:
        self.name, self.budget_tokens = name, budget


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
    assert _names(too_large) == ["huge"] and _names(admitted) == ["ok"] and not ready
