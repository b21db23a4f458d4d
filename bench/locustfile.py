"""Locust user for bench/load.py: one burst of simultaneous /v1/completions requests, every response recorded.

Run by bench/load.py (`locust -f bench/locustfile.py --headless -u N -r N ...`) with BENCH_LOAD_PLAN naming a
JSON plan it wrote: the API key, the server URLs, the distinct requests, and one (request, server, streamed?)
entry per user. Each user sends exactly one request and stops; all users wait at a barrier until the last one
is spawned, so the N requests leave together (a burst, not a ramp). Every response is written, with its text
and timings, to the plan's `results` file (JSON lines) for bench/load.py to verify against the references;
Locust's own table (and --csv files) show the same requests, plus a TTFT row for the streamed ones.

The SSE body is read line by line from geventhttpclient's response (`FastResponse._response.readline`):
Locust's `iter_content(chunk_size)` blocks until chunk_size bytes have arrived, which would bunch tokens and
falsify time to first token and inter-token latency. `_response` is private, hence the exact pin of locust
(and so of geventhttpclient) in pyproject's dev extras.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import gevent
from gevent.event import Event
from locust import constant, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment
from locust.exception import StopUser

log = logging.getLogger("bench.locustfile")
_PLAN_PATH = os.environ.get("BENCH_LOAD_PLAN")
PLAN: dict[str, Any] = json.loads(Path(_PLAN_PATH).read_text()) if _PLAN_PATH else {}
_user_ids = itertools.count()
_go = Event()  # set once every user is spawned: the burst starts
_all_answered = Event()
_records: list[dict[str, Any]] = []
_written = False


def _write_results() -> None:
    global _written
    if _written or not PLAN:
        return
    _written = True
    with open(PLAN["results"], "w") as out:
        for rec in _records:
            out.write(json.dumps(rec) + "\n")


@events.spawning_complete.add_listener
def _release_burst(user_count: int, **_: Any) -> None:
    log.info("%d users spawned: burst starts", user_count)
    _go.set()


@events.test_start.add_listener
def _watch(environment: Environment, **_: Any) -> None:
    """Quit when every planned request has its answer, or at the deadline (the missing ones are hangs)."""
    if not PLAN:
        raise RuntimeError("BENCH_LOAD_PLAN is not set: this locustfile is run by bench/load.py")

    def watcher() -> None:
        finished = _all_answered.wait(timeout=PLAN["deadline_s"])
        if not finished:
            log.error("deadline: %d of %d requests answered", len(_records), len(PLAN["plan"]))
        _write_results()
        if environment.runner is not None:
            environment.runner.quit()

    gevent.spawn(watcher)


@events.quitting.add_listener
def _on_quit(**_: Any) -> None:
    _write_results()  # also when --run-time ends the test before the watcher does


def _sse_data(line: bytes) -> str | None:
    text = line.decode("utf-8").rstrip("\r\n")
    return text[6:] if text.startswith("data: ") else None


class CompletionUser(FastHttpUser):
    wait_time = constant(0)
    # One request per user: a socket that stays silent this long is a hang (recorded, and fails the bench).
    network_timeout = float(PLAN.get("request_timeout_s", 300.0))
    connection_timeout = float(PLAN.get("request_timeout_s", 300.0))
    host = PLAN["urls"][0] if PLAN else None

    @task
    def one_request(self) -> None:
        uid = next(_user_ids)
        if uid >= len(PLAN["plan"]):
            raise StopUser()
        _go.wait()
        try:
            rec = self._send(uid)
        except Exception as exc:  # recorded, so the bench reports it instead of losing the request
            rec = {"i": uid, "status": 0, "error": f"client: {type(exc).__name__}: {exc}"}
        _records.append(rec)
        if len(_records) == len(PLAN["plan"]):
            _all_answered.set()
        raise StopUser()

    def _send(self, uid: int) -> dict[str, Any]:
        k, url_index, stream = PLAN["plan"][uid]
        spec = PLAN["requests"][k]
        body: dict[str, Any] = {"model": spec["model"], "prompt": spec["prompt"], "max_tokens": PLAN["max_tokens"],
                                "temperature": 0, "ignore_eos": True}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        name = "/v1/completions (stream)" if stream else "/v1/completions"
        rec: dict[str, Any] = {"i": uid, "k": k, "url": url_index, "stream": stream}
        url = PLAN["urls"][url_index] + "/v1/completions"
        headers = {"Authorization": f"Bearer {PLAN['api_key']}", "Accept-Encoding": "identity"}
        rec["t_send"] = time.time()
        t0 = time.perf_counter()
        with self.client.post(url, json=body, headers=headers, name=name, stream=True,
                              catch_response=True) as resp:
            status = resp.status_code
            rec["status"] = status
            rec["retry_after"] = resp.headers.get("retry-after") if resp.headers else None
            if status == 0:
                err = getattr(resp, "error", None)
                rec["error"] = f"{type(err).__name__}: {err}"
                rec["timeout"] = isinstance(err, TimeoutError)
            elif status != 200:
                rec["body"] = (resp.text or "")[:300]
                if status in (429, 503) and rec["retry_after"]:
                    resp.failure(f"shed {status} (Retry-After: {rec['retry_after']})")
                else:
                    resp.failure(f"{status} {rec['body'][:120]}")
            elif stream:
                self._read_stream(resp, rec, t0)
            else:
                data = json.loads(resp.content or b"{}")
                rec["text"] = data["choices"][0]["text"]
                rec["finish_reason"] = data["choices"][0]["finish_reason"]
                rec["completion_tokens"] = data["usage"]["completion_tokens"]
            rec["latency_s"] = time.perf_counter() - t0
            rec["t_end"] = time.time()
            # Locust times a stream=True request to its headers; the whole answer is what a client waits for.
            resp.request_meta["response_time"] = rec["latency_s"] * 1000
            if status == 200 and not rec.get("error"):
                expected = PLAN["references"][k]
                if rec.get("text") != expected:
                    resp.failure("wrong answer (differs from the request served alone)")
                elif rec.get("completion_tokens") != PLAN["max_tokens"]:
                    resp.failure(f"{rec.get('completion_tokens')} completion tokens, not {PLAN['max_tokens']}")
            elif status == 200:
                resp.failure(rec["error"])
        if rec.get("ttft_s") is not None:
            self.environment.events.request.fire(request_type="TTFT", name=name, response_time=rec["ttft_s"] * 1000,
                                                 response_length=0, exception=None, context={})
        return rec

    def _read_stream(self, resp: Any, rec: dict[str, Any], t0: float) -> None:
        raw = resp._response  # geventhttpclient's response: readline returns as soon as a line is there
        parts: list[str] = []
        last: float | None = None
        gaps: list[float] = []
        try:
            while True:
                line = raw.readline(b"\n")
                if not line:
                    break  # end of the body
                data = _sse_data(line)
                if data is None:
                    continue
                if data == "[DONE]":
                    rec["done"] = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    rec["error"] = f"stream error event: {json.dumps(chunk)[:200]}"
                    continue
                if chunk.get("usage"):
                    rec["completion_tokens"] = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    if choice.get("finish_reason"):
                        rec["finish_reason"] = choice["finish_reason"]
                    if choice.get("text"):
                        now = time.perf_counter()
                        if last is None:
                            rec["ttft_s"] = now - t0
                        else:
                            gaps.append(now - last)
                        last = now
                        parts.append(choice["text"])
        except Exception as exc:  # a timeout or a cut connection mid-stream
            rec["error"] = f"stream read: {type(exc).__name__}: {exc}"
            rec["timeout"] = isinstance(exc, TimeoutError)
        rec["text"] = "".join(parts)
        rec["itl_s"] = gaps
        if not rec.get("done") and not rec.get("error"):
            rec["error"] = "stream ended without data: [DONE]"
