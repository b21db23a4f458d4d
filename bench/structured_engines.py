"""Grammar engines for structured outputs, compared on the embedded model's tokenizer (SmolLM2, 49152 tokens).

For each candidate (xgrammar, llguidance, outlines-core) and a few JSON schemas: the one-off tokenizer set-up,
the compile time of each schema (cold: a fresh compiler, no cache), and the per-step cost of a 32-row batch
whose rows each follow their own schema: compute the 32 token masks, apply them to [32, 49152] logits, advance
every row by one token of a valid document. Run once, briefly; results go to bench/RESULTS.md.

    python -m bench.structured_engines [--tokenizer-dir DIR] [--steps 40] [--engines llguidance,xgrammar,outlines]

The candidates are imported here only (llguidance is the one the server depends on; install the others by hand
to compare: `pip install xgrammar==0.2.9 outlines-core==0.2.14`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROWS = 32

SCHEMAS: dict[str, tuple[dict[str, Any], Any]] = {
    "flat": (
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
         "required": ["name", "age"], "additionalProperties": False},
        {"name": "Ann Lee", "age": 41},
    ),
    "nested": (
        {"type": "object", "additionalProperties": False,
         "properties": {
             "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
             "score": {"type": "number", "minimum": 0, "maximum": 1},
             "status": {"enum": ["open", "closed", "pending"]},
             "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
             "owner": {"type": "object", "additionalProperties": False,
                       "properties": {"email": {"type": "string"}, "level": {"type": "integer", "minimum": 1,
                                                                              "maximum": 9}},
                       "required": ["email", "level"]}},
         "required": ["id", "score", "status", "tags", "owner"]},
        {"id": "ABC-1234", "score": 0.75, "status": "pending", "tags": ["red", "blue", "a longer tag"],
         "owner": {"email": "ann@example.com", "level": 3}},
    ),
    "tool_calls": (
        {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
             "properties": {"name": {"const": f"tool_{i}"},
                            "arguments": {"type": "object", "additionalProperties": False,
                                          "required": ["city", "unit"],
                                          "properties": {"city": {"type": "string"},
                                                         "unit": {"enum": ["c", "f"]},
                                                         "days": {"type": "integer", "minimum": 1}}}}}
            for i in range(8)]}},
        [{"name": "tool_3", "arguments": {"city": "Paris", "unit": "c", "days": 3}},
         {"name": "tool_7", "arguments": {"city": "Oslo", "unit": "f"}}],
    ),
}


class Candidate:
    """One grammar engine behind a common face: compile a schema, make a matcher, fill masks, advance."""

    name = ""

    def setup(self, hf_tok: Any, vocab: int) -> None: ...
    def compile(self, schema: dict[str, Any]) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None: ...
    def advance(self, matcher: Any, token: int) -> bool: ...


class LLGuidance(Candidate):
    name = "llguidance"

    def setup(self, hf_tok: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab)
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        m = self.ll.LLMatcher(self.tok, grammar)  # builds the parser; the lexer is built lazily ...
        m.compute_bitmask()  # ... so the first mask is part of compiling
        assert not m.is_error(), m.get_error()
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.ll.LLMatcher(self.tok, compiled)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                              bitmask.shape[1] * 4, bitmask.shape[0])

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))


class LLGuidanceSerial(LLGuidance):
    name = "llguidance (one row at a time)"

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        for i, m in enumerate(matchers):
            row = bitmask[i]
            m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)


class XGrammar(Candidate):
    name = "xgrammar"

    def setup(self, hf_tok: Any, vocab: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab)
        self.batch = xgrammar.BatchGrammarMatcher()

    def compile(self, schema: dict[str, Any]) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)  # cold: nothing cached
        return compiler.compile_json_schema(json.dumps(schema))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))


class OutlinesCore(Candidate):
    name = "outlines-core"

    def setup(self, hf_tok: Any, vocab: int) -> None:
        import outlines_core

        self.oc = outlines_core
        byte_of = {c: b for b, c in enumerate(_bytes_to_unicode())}
        special = set(hf_tok.all_special_ids)
        table: dict[bytes, list[int]] = {}
        for tid in range(len(hf_tok)):
            if tid in special:
                continue
            piece = hf_tok.convert_ids_to_tokens(tid)
            if piece is None or any(ch not in byte_of for ch in piece):
                continue
            table.setdefault(bytes(byte_of[ch] for ch in piece), []).append(tid)
        self.vocab = outlines_core.Vocabulary(int(hf_tok.eos_token_id), table)

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        for i, g in enumerate(matchers):
            row = bitmask[i]
            g.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    def advance(self, matcher: Any, token: int) -> bool:
        matcher.advance(token)
        return True


def _bytes_to_unicode() -> list[str]:
    from app.engine.byte_tokenizer import _bytes_to_unicode as table

    return table()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Disallowed tokens to -inf in place: logits [R, V] float32, bitmask [R, ceil(V / 32)] int32 (bit j of word
    w allows token 32 w + j)."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[1]]
    logits.masked_fill_(torch.from_numpy(bits.view(np.bool_)).logical_not(), float("-inf"))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def run(candidate: Candidate, hf_tok: Any, vocab: int, steps: int) -> dict[str, Any]:
    _, setup_ms = timed(lambda: candidate.setup(hf_tok, vocab))
    compiled, compile_ms = {}, {}
    for name, (schema, _) in SCHEMAS.items():
        compiled[name], compile_ms[name] = timed(lambda s=schema: candidate.compile(s))  # type: ignore[misc]
    names = list(SCHEMAS)
    docs = {n: hf_tok.encode(json.dumps(SCHEMAS[n][1], separators=(",", ":")), add_special_tokens=False)
            for n in names}
    # Row i follows schema i % 3, started i // 3 tokens in, so the rows sit at different points of their documents.
    rows = []
    for i in range(ROWS):
        name = names[i % len(names)]
        m = candidate.matcher(compiled[name])
        for t in docs[name][: i // len(names)]:
            assert candidate.advance(m, t)
        rows.append([name, m, i // len(names)])
    bitmask = torch.full((ROWS, (vocab + 31) // 32), -1, dtype=torch.int32)
    logits = torch.randn(ROWS, vocab)
    fill_ms, apply_ms, advance_ms = [], [], []
    for _ in range(steps):
        for r in rows:
            if r[2] >= len(docs[r[0]]):  # document done: a fresh matcher starts it again
                r[1], r[2] = candidate.matcher(compiled[r[0]]), 0
        _, ms = timed(lambda: candidate.fill([r[1] for r in rows], bitmask))
        fill_ms.append(ms)
        x = logits.clone()
        _, ms = timed(lambda x=x: apply_bitmask(x, bitmask))  # type: ignore[misc]
        apply_ms.append(ms)
        t0 = time.perf_counter()
        for i, r in enumerate(rows):
            name, m, pos = r
            token = docs[name][pos]
            assert int(bitmask[i, token // 32]) >> (token % 32) & 1, f"{candidate.name}: a valid token masked"
            assert candidate.advance(m, token)
            r[2] = pos + 1
        advance_ms.append((time.perf_counter() - t0) * 1e3)
    return {"setup_ms": setup_ms, "compile_ms": compile_ms, "fill_ms": statistics.median(fill_ms),
            "apply_ms": statistics.median(apply_ms), "advance_ms": statistics.median(advance_ms)}


def _tokenizer(tokenizer_dir: Path | None) -> Any:
    from transformers import AutoTokenizer

    if tokenizer_dir is None:
        from app.engine.gguf_cache import embedded_gguf_path, ensure_converted

        tokenizer_dir = ensure_converted(embedded_gguf_path(), Path("data"))
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


CANDIDATES: dict[str, type[Candidate]] = {"llguidance": LLGuidance, "llguidance-serial": LLGuidanceSerial,
                                          "xgrammar": XGrammar, "outlines": OutlinesCore}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer-dir", type=Path, default=None, help="default: the embedded model's, converted")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--engines", default="llguidance,llguidance-serial,xgrammar,outlines")
    args = ap.parse_args()
    hf_tok = _tokenizer(args.tokenizer_dir)
    vocab = len(hf_tok)
    print(f"tokenizer: {vocab} tokens; {ROWS} rows; torch threads {torch.get_num_threads()}")
    for key in args.engines.split(","):
        res = run(CANDIDATES[key](), hf_tok, vocab, args.steps)
        comp = ", ".join(f"{k} {v:.1f}" for k, v in res["compile_ms"].items())
        print(f"{CANDIDATES[key].name}: tokenizer set-up {res['setup_ms']:.0f} ms; compile (ms) {comp}; per step "
              f"at {ROWS} rows: masks {res['fill_ms']:.2f} ms, apply {res['apply_ms']:.2f} ms, advance "
              f"{res['advance_ms']:.2f} ms (medians of {args.steps})")


if __name__ == "__main__":
    main()
