"""The engine's book of requests: the waiting count `max_waiting` bounds, the async side's asks, finishing."""

from __future__ import annotations

import threading

import pytest

from app.engine.admission import EngineStats
from app.engine.book import RequestBook
from app.engine.rowstate import ActiveRequest
from app.engine.types import EngineOverloaded, GenerationRequest, TokenEvent


class _Text:
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


def request(rid: str, events: list[TokenEvent] | None = None) -> ActiveRequest:
    sink: list[TokenEvent] = [] if events is None else events
    return ActiveRequest(GenerationRequest([1, 2], request_id=rid), _Text(), sink.append)


def test_max_waiting_bounds_the_places_and_stats_mirror_the_count() -> None:
    stats = EngineStats()
    book = RequestBook(stats=stats, max_waiting=2)
    book.take_place()
    book.take_place()
    with pytest.raises(EngineOverloaded, match="2 requests are already waiting"):
        book.take_place()
    assert stats.waiting == 2
    first = request("a")
    book.add(first)
    book.leave_queue(first)
    book.leave_queue(first)  # admitted once: counted down once
    assert stats.waiting == 1 and not first.queued
    book.take_place()  # the freed place is taken again
    assert stats.waiting == 2


def test_finish_sends_one_final_event_frees_the_place_and_forgets_the_request() -> None:
    stats = EngineStats()
    book = RequestBook(stats=stats, max_waiting=8)
    events: list[TokenEvent] = []
    book.take_place()
    active = request("a", events)
    book.add(active)
    book.finish(active, "error", error="boom", kind="internal")
    book.finish(active, "cancelled")  # already done: nothing more goes out
    assert [(e.final, e.finish_reason, e.error) for e in events] == [(True, "error", "boom")]
    assert book.active == {} and stats.waiting == 0


def test_asks_are_taken_once_and_a_requeued_copy_waits_again() -> None:
    stats = EngineStats()
    book = RequestBook(stats=stats, max_waiting=8)
    book.cancel("a")
    book.fail_all("shutting down")
    assert book.take_asks() == ({"a"}, "shutting down")
    assert book.take_asks() == (set(), None)
    old = request("b")
    book.add(old)
    book.take_place()
    book.leave_queue(old)  # admitted, then preempted: its fresh copy queues under the same id
    fresh = request("b")
    book.requeued(fresh)
    assert book.active["b"] is fresh and stats.waiting == 1


def test_late_names_only_requests_past_their_deadline() -> None:
    book = RequestBook(stats=EngineStats(), max_waiting=8)
    due, later, none = request("due"), request("later"), request("none")
    due.deadline, later.deadline = 10.0, 20.0
    for a in (due, later, none):
        book.add(a)
    assert book.late(15.0) == [due]
    assert {a.request_id for a in book.late(20.0)} == {"due", "later"}


def test_the_check_and_the_count_of_a_place_are_one_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two submitters at once for the last place: exactly one gets it. The first to count waits there for the other
    (bounded); were the check and the count apart, the other would pass the check meanwhile and both would count."""
    book = RequestBook(stats=EngineStats(), max_waiting=1)
    counting, second_inside = [0], threading.Event()
    original = RequestBook._count

    def slow_count(self: RequestBook, delta: int) -> None:
        counting[0] += 1
        if counting[0] == 1:
            second_inside.wait(0.5)  # under the lock the other cannot get here; it waits for the lock instead
        else:
            second_inside.set()
        original(self, delta)

    monkeypatch.setattr(RequestBook, "_count", slow_count)
    start, taken, refused = threading.Barrier(2), [], []

    def submitter() -> None:
        start.wait()
        try:
            book.take_place()
            taken.append(1)
        except EngineOverloaded:
            refused.append(1)

    threads = [threading.Thread(target=submitter) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(taken), len(refused)) == (1, 1) and not second_inside.is_set()
