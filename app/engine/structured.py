"""Structured outputs: a request's constraint (JSON schema, regex, grammar, choice) compiled for the served
tokenizer, cached, and one matcher per row.

The grammar engine is llguidance (why, and what was measured: docs/structured-outputs.md). A constraint is
compiled off the engine thread, before its row reaches the batch (`StructuredCompiler.row_grammar`, awaited by
the engine client), into a template matcher kept in an LRU keyed by the normalized constraint
(app/engine/protocol.py `StructuredOutput`); each row gets a copy of it (`deep_copy`, ~10 us, sharing the
template's lexer tables) that token selection advances (app/engine/structured_mask.py). An invalid constraint
is a `StructuredOutputError` naming the request field, which the API answers with a 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf

from app.engine.protocol import StructuredOutput, StructuredOutputError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

log = logging.getLogger(__name__)

COMPILE_THREADS = 2

# JSON's whitespace between two tokens, at most this long unless the request says otherwise: llguidance's default
# allows any run, and a model can loop in it until max_tokens (a random-weight one does so at once, greedy);
# 20 characters still take a newline and an indent of 19 (pretty-printed JSON nested 4 deep at 4 spaces).
DEFAULT_JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,20}"
CACHE_SIZE = 256  # compiled constraints kept (a template matcher is small: its grammar and lexer tables)

_WHAT = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar", "choice": "choice list"}


class RowGrammar:
    """One row's grammar state: an llguidance matcher, advanced by one token per step (engine thread only).

    finished: the grammar is complete and takes no more tokens (the row then ends with "stop"), or the matcher
    failed (`error` says why; the row then ends with an error).
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size  # the width of the matcher's masks (>= the model's logits)
        self.error: str | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or bool(self.matcher.is_stopped())

    def restart(self) -> RowGrammar:
        """Back to the grammar's start (for a row prefilled again from its start); returns self."""
        self.matcher.reset()
        self.error = None
        return self

    def fill_mask(self, row_ptr: int, nbytes: int) -> None:
        """Write the allowed next tokens as bits (token t: bit t % 32 of int32 word t // 32) at `row_ptr`."""
        self.matcher.unsafe_compute_mask_ptr(row_ptr, nbytes)

    def advance(self, token_id: int) -> None:
        if self.error is None and not self.matcher.consume_token(token_id):
            self.error = f"the grammar rejected token {token_id}: {self.matcher.get_error()}"
            log.error("structured output: %s", self.error)


def grammar_text(so: StructuredOutput) -> str:
    """llguidance's grammar for `so`; raises StructuredOutputError for a spec it cannot even read."""
    try:
        if so.kind == "json_schema":
            options: JsonCompileOptions = (
                {"whitespace_flexible": False} if so.whitespace == ""
                else {"whitespace_pattern": so.whitespace or DEFAULT_JSON_WHITESPACE})
            return str(llguidance.LLMatcher.grammar_from_json_schema(so.spec, overrides=options))
        if so.kind == "regex":
            return str(llguidance.LLMatcher.grammar_from_regex(so.spec))
        if so.kind == "choice":
            choices = json.loads(so.spec)
            # Lark string literals take JSON's escapes; non-ASCII stays as it is (Lark has no \u escapes).
            return str(llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)))
        return str(llguidance.grammar_from("grammar", so.spec))  # Lark, or GBNF/EBNF converted to Lark
    except ValueError as exc:
        raise StructuredOutputError(f"invalid {_WHAT[so.kind]}: {exc}", param=so.param) from None


class StructuredCompiler:
    """Compiles constraints for one tokenizer and caches them (LRU by the normalized constraint).

    tokenizer: the served HF fast tokenizer (real models) or the byte tokenizer of `random:` presets;
    vocab_size: the model's logits width (a model may have more rows than its tokenizer has tokens: those are
    never allowed); eos_token_ids: what ends a row, allowed once the grammar is complete.
    """

    def __init__(self, tokenizer: Any, *, vocab_size: int, eos_token_ids: frozenset[int],
                 cache_size: int = CACHE_SIZE) -> None:
        self._hf = tokenizer
        self.vocab_size = max(int(vocab_size), len(tokenizer))
        self._eos = sorted(eos_token_ids)
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._lltok: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()
        self._compiling: dict[StructuredOutput, Future[llguidance.LLMatcher]] = {}
        # Compiling is CPU work in llguidance (no torch, no OpenMP pool): a few threads at most, so a burst of
        # requests with new constraints queues for them instead of starting a thread each.
        self._workers = ThreadPoolExecutor(max_workers=COMPILE_THREADS, thread_name_prefix="grammar")
        self.compiled = 0  # compilations run (cache misses), for tests and logs

    def _tokenizer(self) -> llguidance.LLTokenizer:
        """The tokenizer as llguidance sees it: built once, at the first constraint (~0.5 s for 49152 tokens)."""
        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size, eos_token=self._eos)
            return self._lltok

    def compile(self, so: StructuredOutput) -> llguidance.LLMatcher:
        """The template matcher of `so` (blocking; cached). Raises StructuredOutputError when it is invalid."""
        with self._lock:
            hit = self._cache.get(so)
            if hit is not None:
                self._cache.move_to_end(so)
                return hit
        started = time.perf_counter()
        text = grammar_text(so)
        matcher = llguidance.LLMatcher(self._tokenizer(), text, log_level=0)
        if not matcher.is_error():
            matcher.compute_bitmask()  # builds the first lexer states; some errors only show here
        if matcher.is_error():
            raise StructuredOutputError(f"invalid {_WHAT[so.kind]}: {matcher.get_error()}", param=so.param)
        with self._lock:
            self.compiled += 1
            self._cache[so] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        log.debug("compiled a %s in %.1f ms", so.kind, (time.perf_counter() - started) * 1e3)
        return matcher

    async def row_grammar(self, so: StructuredOutput) -> RowGrammar:
        """A fresh matcher for one row. A cached constraint costs a copy; a new one is compiled on one of the
        compiler's few threads (never the engine's, never the event loop), once however many rows ask for it at
        the same time."""
        fut: Future[llguidance.LLMatcher] | None = None
        with self._lock:
            template = self._cache.get(so)
            if template is not None:
                self._cache.move_to_end(so)
            else:
                fut = self._compiling.get(so)
                if fut is None:
                    fut = self._compiling[so] = self._workers.submit(self.compile, so)
                    fut.add_done_callback(lambda _f: self._forget(so))
        if fut is not None:
            try:
                template = await asyncio.wrap_future(fut)
            except StructuredOutputError as exc:  # name this request's field (another may have started it)
                raise StructuredOutputError(str(exc), param=so.param) from None
        assert template is not None
        return RowGrammar(template.deep_copy(), self.vocab_size)

    def _forget(self, so: StructuredOutput) -> None:
        with self._lock:
            self._compiling.pop(so, None)
