"""The admission policy on its own: first come, first served within the row and token budgets; interactive
requests before batch ones, taking the place of running batch rows when they need it."""

from __future__ import annotations

from collections import deque

from app.engine.admission import EngineLimits, admit


class _Request:
    def __init__(self, prompt_len: int, priority: str) -> None:
        self.prompt_ids = [1] * prompt_len
        self.priority = priority


class _Req:
    def __init__(self, name: str, budget: int, prefix_len: int = 0, prompt_len: int = 1, *,
                 priority: str = "interactive", generated: int = 0) -> None:
        self.name, self.budget_tokens, self.prefix_len = name, budget, prefix_len
        self.request = _Request(prompt_len, priority)
        self.completion_tokens = generated


def _batch(name: str, budget: int, generated: int = 0) -> _Req:
    return _Req(name, budget, priority="batch", generated=generated)


def _names(reqs: list) -> list[str]:  # type: ignore[type-arg]
    return [r.name for r in reqs]


def test_admits_in_order_within_both_budgets_and_never_lets_a_later_request_overtake() -> None:
    ready = deque([_Req("a", 40), _Req("b", 40), _Req("c", 10), _Req("d", 10)])
    got = admit(ready, running=[_Req("r", 10)],  # type: ignore[arg-type, list-item]
                limits=EngineLimits(max_batch_rows=4, max_batch_tokens=100))
    # a fits (50), b would make 90 ≤ 100 -> fits; c would make 100 -> fits, but rows: 1 + 3 = 4 is the limit
    assert _names(got.admitted) == ["a", "b", "c"] and got.refused == [] and _names(list(ready)) == ["d"]

    ready = deque([_Req("big", 80), _Req("small", 5)])
    got = admit(ready, running=[_Req("r", 30)],  # type: ignore[arg-type, list-item]
                limits=EngineLimits(max_batch_rows=8, max_batch_tokens=100))
    assert got.admitted == [] and _names(list(ready)) == ["big", "small"]  # small waits behind big


def test_a_request_that_can_never_fit_is_handed_back_as_too_large() -> None:
    ready = deque([_Req("huge", 500), _Req("ok", 50)])
    got = admit(ready, running=[],  # type: ignore[arg-type]
                limits=EngineLimits(max_batch_rows=8, max_batch_tokens=100))
    assert [r.name for r, _ in got.refused] == ["huge"] and _names(got.admitted) == ["ok"] and not ready
    assert "token budget" in got.refused[0][1]


def test_prefix_plus_prompt_beyond_the_context_is_refused_once_the_prefix_is_known() -> None:
    ready = deque([_Req("long", 40, prefix_len=20, prompt_len=12), _Req("fits", 40, prefix_len=20, prompt_len=11)])
    got = admit(ready, running=[], limits=EngineLimits(max_positions=32))  # type: ignore[arg-type]
    assert [r.name for r, _ in got.refused] == ["long"] and _names(got.admitted) == ["fits"]
    assert "context of 32 positions" in got.refused[0][1]


# ---- priorities --------------------------------------------------------------------------------------------------
LIMITS = EngineLimits(max_batch_rows=4, max_batch_tokens=100)


def test_waiting_interactive_requests_are_admitted_before_older_batch_requests() -> None:
    ready = deque([_batch("b1", 10), _batch("b2", 10), _Req("i1", 10), _batch("b3", 10), _Req("i2", 10)])
    got = admit(ready, running=[], limits=LIMITS)  # type: ignore[arg-type]
    # Both interactive ones first, then batch ones in their order into the two rows left.
    assert _names(got.admitted) == ["i1", "i2", "b1", "b2"] and _names(list(ready)) == ["b3"]
    assert got.preempted == []


def test_no_batch_request_is_admitted_while_an_interactive_one_waits() -> None:
    # Interactive rows fill the batch but one: the waiting interactive request needs 60 tokens, only 40 are free
    # (and no batch row runs to give up), so it waits -- and the small batch request that would fit waits too.
    running = [_Req("r1", 30), _Req("r2", 30)]
    ready = deque([_Req("i", 60), _batch("b", 5)])
    got = admit(ready, running=running, limits=LIMITS)  # type: ignore[arg-type, list-item]
    assert got.admitted == [] and got.preempted == [] and _names(list(ready)) == ["i", "b"]


def test_an_interactive_request_takes_the_place_of_the_batch_rows_with_the_least_work_done() -> None:
    running = [_Req("r", 10), _batch("old", 10, generated=9), _batch("young", 10, generated=2),
               _batch("mid", 10, generated=5)]
    ready = deque([_Req("i", 10), _batch("waiting", 10)])
    got = admit(ready, running=running, limits=LIMITS)  # type: ignore[arg-type, list-item]
    # Rows are full (4): one batch row gives its place up, the one with the fewest generated tokens.
    assert _names(got.admitted) == ["i"] and _names(got.preempted) == ["young"]
    assert _names(list(ready)) == ["waiting"]  # no batch request joins while batch rows are being preempted

    # By tokens: 80 of 100 reserved, the request needs 50, so 30 tokens must go: the two least-advanced rows.
    running = [_Req("r", 20), _batch("a", 20, generated=1), _batch("b", 20, generated=3), _batch("c", 20, generated=2)]
    got = admit(deque([_Req("i", 50)]), running=running,  # type: ignore[arg-type, list-item]
                limits=EngineLimits(max_batch_rows=8, max_batch_tokens=100))
    assert _names(got.admitted) == ["i"] and _names(got.preempted) == ["a", "c"]


def test_interactive_rows_are_never_preempted_and_batch_rows_only_when_that_makes_room() -> None:
    # Giving up the one batch row would free 10 tokens; 50 are missing: nothing is preempted, the request waits.
    running = [_Req("r1", 45), _Req("r2", 45), _batch("b", 10)]
    ready = deque([_Req("i", 60)])
    got = admit(ready, running=running, limits=EngineLimits(max_batch_rows=8, max_batch_tokens=100))  # type: ignore[arg-type, list-item]
    assert got.admitted == [] and got.preempted == [] and _names(list(ready)) == ["i"]


def test_batch_requests_fill_what_interactive_ones_leave_free() -> None:
    running = [_Req("r", 50)]
    ready = deque([_batch("b1", 30), _batch("b2", 30), _batch("b3", 10)])
    got = admit(ready, running=running, limits=LIMITS)  # type: ignore[arg-type, list-item]
    # b1 fits (80), b2 would make 110: it waits, and b3 behind it (first come, first served among batch requests).
    assert _names(got.admitted) == ["b1"] and _names(list(ready)) == ["b2", "b3"]
