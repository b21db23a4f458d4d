"""The scheduler: joins without draining, budgets, cancellation, backpressure, failures isolated to their rows."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.engine.sampling import SamplingParams
from app.engine.types import EngineOverloaded, GenerationRequest, RequestTooLarge
from tests.engine.helpers import StepProbe, collect, make_engine, random_prefix, until

LONG = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


async def test_new_request_joins_running_batch(tiny_llama) -> None:
    engine = make_engine(tiny_llama)
    # The long request's decoding is held until the short one is queued: otherwise a fast machine may finish
    # the long one before the short one arrives, and nothing would be joined.
    probe = StepProbe(engine)
    probe.hold()
    try:
        long_task = asyncio.create_task(collect(engine, GenerationRequest([1, 2, 3], LONG, request_id="long")))
        await until(probe.decoding.is_set, "the long request decoding")
        short_task = asyncio.create_task(collect(engine, GenerationRequest([4, 5], SHORT, request_id="short")))
        await until(lambda: engine.stats.waiting == 1, "the short request queued")
        probe.release()
        short = await short_task
        assert len(short.tokens) == 4
        # Prefilled while the long one ran, then decoded in the same batch: it did not wait for a drain.
        assert (frozenset({"short"}), frozenset({"long"})) in probe.prefills
        assert sum(d == {"long", "short"} for d in probe.decodes) == 3  # its tokens 2..4, next to the long one
        assert len((await long_task).tokens) == 200
    finally:
        engine.stop()


async def test_a_burst_on_an_idle_engine_is_prefilled_together(tiny_llama) -> None:
    """Requests submitted together to an idle engine share one prefill (coalescing window after the wake-up),
    instead of the first arrival alone and the rest one step later."""
    engine = make_engine(tiny_llama, coalesce_s=0.05)  # wide, so a loaded machine cannot split the burst
    try:
        await collect(engine, GenerationRequest([1, 2], SHORT))
        await until(engine.idle.is_set, "the engine waits for work again")
        before = engine.stats.prefills
        # spread over 14 ms, like clients arriving together (a plain gather fits in one GIL switch interval)
        results = await asyncio.gather(
            *[collect(engine, GenerationRequest([3, i + 4], SHORT), delay=0.002 * i) for i in range(8)]
        )
        assert all(len(r.tokens) == 4 for r in results)
        assert engine.stats.prefills - before == 1
    finally:
        engine.stop()


async def test_cancel_by_leaving_the_iterator(tiny_llama) -> None:
    engine = make_engine(tiny_llama)
    try:
        other = asyncio.create_task(
            collect(
                engine,
                GenerationRequest([9, 9], SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)),
            )
        )
        got = 0
        async for _ev in engine.submit(GenerationRequest([1, 2, 3], LONG, request_id="cancel-me")):
            got += 1
            if got == 3:
                break
        await until(lambda: "cancel-me" not in engine.requests.active, "the cancelled request leaving the engine")
        res = await other
        assert len(res.tokens) == 60 and res.final is not None and res.final.finish_reason == "length"
    finally:
        engine.stop()


async def test_batch_rows_budget(tiny_llama) -> None:
    engine = make_engine(tiny_llama, max_batch_rows=3)
    try:
        await asyncio.gather(
            *[
                collect(
                    engine,
                    GenerationRequest(
                        [i + 1, 2], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
                    ),
                )
                for i in range(8)
            ]
        )
        assert max(engine.stats.batch_sizes) == 3
    finally:
        engine.stop()


async def test_token_budget_counts_prefix_tokens(tiny_llama) -> None:
    # each request reserves 30 prefix + 2 prompt + 8 new = 40 tokens: a budget of 100 admits two at a time
    engine = make_engine(tiny_llama, max_batch_tokens=100)
    try:
        reqs = [
            GenerationRequest(
                [1, 2],
                SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                prefix=random_prefix(tiny_llama, 30, seed=i),
            )
            for i in range(5)
        ]
        await asyncio.gather(*[collect(engine, r) for r in reqs])
        assert max(engine.stats.batch_sizes) == 2
    finally:
        engine.stop()


async def test_request_too_large_and_overload(tiny_llama) -> None:
    engine = make_engine(tiny_llama, max_batch_tokens=50, max_waiting=2)
    try:
        with pytest.raises(RequestTooLarge):
            await collect(engine, GenerationRequest(list(range(1, 40)), SamplingParams(max_tokens=20)))
        gate = threading.Event()

        def slow_prefix():
            gate.wait(10)
            return random_prefix(tiny_llama, 2, seed=0)

        waiting = [
            asyncio.create_task(collect(engine, GenerationRequest([1], SHORT, prefix=slow_prefix)))
            for _ in range(2)
        ]
        await until(lambda: engine.stats.waiting == 2, "both requests waiting for their prefix")
        with pytest.raises(EngineOverloaded):
            await collect(engine, GenerationRequest([1], SHORT))
        gate.set()
        for t in waiting:
            assert len((await t).tokens) == 4
        # the queue drained: new requests are accepted again
        assert len((await collect(engine, GenerationRequest([1], SHORT))).tokens) == 4
    finally:
        engine.stop()


async def test_slow_prefix_load_does_not_stall_other_rows(tiny_llama) -> None:
    engine = make_engine(tiny_llama)
    loading, release = threading.Event(), threading.Event()
    try:

        def slow_prefix():
            loading.set()
            release.wait(60)  # bounded: a failing test must not leave the loader thread for good
            return random_prefix(tiny_llama, 3, seed=0)

        slow = asyncio.create_task(collect(engine, GenerationRequest([1, 2], SHORT, prefix=slow_prefix)))
        await asyncio.to_thread(loading.wait, 60)
        # The load cannot finish before `release`: a fast request that waited for it would never end.
        fast = await asyncio.wait_for(collect(engine, GenerationRequest([3, 4], SHORT)), 60)
        assert len(fast.tokens) == 4 and not slow.done()
        release.set()
        assert len((await slow).tokens) == 4
    finally:
        engine.stop()


async def test_failing_prefix_load_fails_only_that_request(tiny_llama) -> None:
    engine = make_engine(tiny_llama)
    try:

        def broken():
            raise KeyError("no such prefix")

        bad, good = await asyncio.gather(
            collect(engine, GenerationRequest([1, 2], SHORT, prefix=broken)),
            collect(engine, GenerationRequest([1, 2], SHORT)),
        )
        assert (
            bad.final is not None
            and bad.final.finish_reason == "error"
            and "no such prefix" in bad.final.error
        )
        assert bad.final.error_kind == "prefix_unavailable"
        assert len(good.tokens) == 4
    finally:
        engine.stop()


async def test_exception_in_prefill_fails_only_the_new_rows(tiny_llama) -> None:
    engine = make_engine(tiny_llama)
    real = engine.runner.forward

    def flaky(batch):
        if batch.input_ids.shape[1] > 1 and batch.rows[0].request_id == "doomed":
            raise RuntimeError("boom")
        return real(batch)

    engine.runner.forward = flaky  # type: ignore[method-assign]
    # The running request's decoding is held until the doomed one is queued, so the failing prefill really
    # happens next to a running row (a fast machine could otherwise finish it first).
    probe = StepProbe(engine)
    probe.hold()
    try:
        running = asyncio.create_task(
            collect(
                engine,
                GenerationRequest([1, 2, 3], SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True),
                                  request_id="running"),
            )
        )
        await until(probe.decoding.is_set, "the first request decoding")
        doomed_task = asyncio.create_task(collect(engine, GenerationRequest([5, 6], SHORT, request_id="doomed")))
        await until(lambda: engine.stats.waiting == 1, "the doomed request queued")
        probe.release()
        doomed = await doomed_task
        assert doomed.final is not None and doomed.final.finish_reason == "error"
        assert doomed.final.error_kind == "internal"
        assert (frozenset({"doomed"}), frozenset({"running"})) in probe.prefills
        res = await running
        assert len(res.tokens) == 80 and res.final is not None and res.final.finish_reason == "length"
    finally:
        engine.stop()


async def test_eos_and_stop_strings_finish_with_stop(tiny_llama) -> None:
    engine = make_engine(tiny_llama)
    try:
        free = await collect(
            engine,
            GenerationRequest([1, 2, 3], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)),
        )
        eos_tok = free.tokens[3]
        engine.eos_token_ids = frozenset({eos_tok})
        with_eos = await collect(
            engine, GenerationRequest([1, 2, 3], SamplingParams(max_tokens=30, temperature=0.0))
        )
        assert with_eos.final is not None and with_eos.final.finish_reason == "stop"
        assert with_eos.tokens == free.tokens[: free.tokens.index(eos_tok) + 1]
        engine.eos_token_ids = frozenset()
        stop = free.text[5:8]
        stopped = await collect(
            engine, GenerationRequest([1, 2, 3], SamplingParams(max_tokens=30, temperature=0.0, stop=(stop,)))
        )
        assert stopped.final is not None and stopped.final.finish_reason == "stop"
        assert stopped.text == free.text[: free.text.index(stop)]
    finally:
        engine.stop()


async def test_requests_that_finish_on_their_first_token(tiny_llama) -> None:
    """max_tokens=1, EOS as the first token, and a stop string in the first token end at prefill, alone and next
    to rows that go on; the engine keeps serving afterwards (this once killed the engine thread)."""
    engine = make_engine(tiny_llama)
    try:
        free = await collect(engine, GenerationRequest([7, 8, 9], SamplingParams(max_tokens=5, temperature=0.0)))
        one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        eos_first = SamplingParams(max_tokens=10, temperature=0.0)
        stop_first = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop=(free.text[:1],))
        long = asyncio.create_task(collect(engine, GenerationRequest([1, 2], LONG)))
        engine.eos_token_ids = frozenset({free.tokens[0]})
        got = await asyncio.gather(*[
            collect(engine, GenerationRequest([7, 8, 9], p)) for p in (one, eos_first, stop_first, SHORT)
        ])
        engine.eos_token_ids = frozenset()
        assert [r.final.finish_reason for r in got if r.final] == ["length", "stop", "stop", "length"]
        assert len(got[0].tokens) == 1 and got[1].tokens == [free.tokens[0]] and got[2].text == ""
        assert len(got[3].tokens) == 4
        assert engine.alive
        assert len((await long).tokens) == 200
        assert len((await collect(engine, GenerationRequest([3], SHORT))).tokens) == 4
    finally:
        engine.stop()


async def test_a_bug_in_a_step_fails_requests_in_flight_but_the_engine_survives(tiny_llama) -> None:
    engine = make_engine(tiny_llama)
    try:
        real = engine._admit
        calls = {"n": 0}

        def broken() -> list:  # type: ignore[type-arg]
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyError("book-keeping bug")
            return real()

        engine._admit = broken  # type: ignore[method-assign]
        failed = await collect(engine, GenerationRequest([1, 2], SHORT))
        assert failed.final is not None and failed.final.finish_reason == "error"
        assert failed.final.error_kind == "internal"
        assert engine.alive
        ok = await collect(engine, GenerationRequest([1, 2], SHORT))
        assert len(ok.tokens) == 4 and ok.final is not None and ok.final.finish_reason == "length"
    finally:
        engine.stop()


async def test_fail_all_requests_ends_running_and_waiting_ones_and_the_engine_serves_on(tiny_llama) -> None:
    """A server whose shutdown grace ran out: every request in flight ends with an error event, at once."""
    engine = make_engine(tiny_llama, max_batch_rows=1)
    try:
        endless = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)
        # Decoding is held until both requests are in place: one running, one waiting for its row.
        probe = StepProbe(engine)
        probe.hold()
        running = asyncio.create_task(collect(engine, GenerationRequest([1, 2, 3], endless, request_id="running")))
        await until(probe.decoding.is_set, "the first request decoding")
        waiting = asyncio.create_task(collect(engine, GenerationRequest([4, 5], endless)))  # no row for it
        await until(lambda: engine.stats.waiting == 1, "the second request waiting")
        engine.fail_all_requests("shutting down")
        probe.release()
        # generous: only a request that never ends fails here, instead of hanging the run
        for res in await asyncio.wait_for(asyncio.gather(running, waiting), 60):
            assert res.final is not None and res.final.finish_reason == "error"
            assert (res.final.error, res.final.error_kind) == ("shutting down", "internal")
            assert len(res.tokens) < 1500
        assert engine.stats.waiting == 0
        after = await collect(engine, GenerationRequest([6, 7], SHORT))
        assert len(after.tokens) == 4
    finally:
        engine.stop()


async def test_a_prefix_load_that_cannot_start_fails_alone(tiny_llama, monkeypatch) -> None:
    """When the loader thread cannot be started, only that request fails (prefix_unavailable); the requests taken
    with it are served (they used to be dropped, never getting a final event)."""
    real_start, calls = threading.Thread.start, []

    def flaky_start(self):  # type: ignore[no-untyped-def]
        if self.name == "prefix-resolve":
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", flaky_start)
    engine = make_engine(tiny_llama, coalesce_s=0.05)  # the three arrive in one intake round
    prefix = random_prefix(tiny_llama, 3, seed=1)
    try:
        results = await asyncio.wait_for(asyncio.gather(  # a dropped request would never end: fail, not hang
            collect(engine, GenerationRequest([1, 2], SHORT)),
            collect(engine, GenerationRequest([3, 4], SHORT, prefix=lambda: prefix)),
            collect(engine, GenerationRequest([5, 6], SHORT, prefix=lambda: prefix)),
        ), timeout=20)
        kinds = [r.final.error_kind if r.final else "hung" for r in results]
        assert sorted(kinds, key=str) == sorted([None, None, "prefix_unavailable"], key=str)
        assert engine.stats.waiting == 0
    finally:
        engine.stop()


async def test_a_cancelled_request_never_starts_its_prefix_load(tiny_llama) -> None:
    """With every loader slot busy, a request cancelled while its load waits never runs that load."""
    engine = make_engine(tiny_llama, resolver_threads=1)
    started, release = threading.Event(), threading.Event()
    ran = threading.Event()
    prefix = random_prefix(tiny_llama, 3, seed=2)

    def slow():  # type: ignore[no-untyped-def]
        started.set()
        release.wait(5)
        return prefix

    def second():  # type: ignore[no-untyped-def]
        ran.set()
        return prefix

    try:
        first = asyncio.create_task(collect(engine, GenerationRequest([1, 2], SHORT, prefix=slow)))
        await asyncio.to_thread(started.wait, 5)
        stream = engine.submit(GenerationRequest([3, 4], SHORT, prefix=second, request_id="waits"))
        pending = asyncio.ensure_future(stream.__anext__())

        def loads_of_waits() -> int:
            return sum(a.request_id == "waits" for a, _ in list(engine._intake.resolving))

        await until(lambda: loads_of_waits() == 1, "the second load queued for the loader slot")
        pending.cancel()  # the consumer leaves: the request is cancelled while its load waits for the slot
        await asyncio.gather(pending, return_exceptions=True)
        await stream.aclose()
        await until(lambda: loads_of_waits() == 0, "the cancelled load dropped")
        release.set()
        assert len((await first).tokens) == 4
        # Every loader thread has ended: a load that was going to run has run by now.
        await until(lambda: not any(t.name == "prefix-resolve" for t in threading.enumerate()),
                    "the loader threads ending")
        assert not ran.is_set()
    finally:
        release.set()
        engine.stop()
