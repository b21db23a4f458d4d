"""A request's sampling fields (completions and chat share them) as the engine's SamplingParams, one per choice.

Ranges were checked by the wire models; what needs the served model is checked here: token ids in `logit_bias`
and `stop_token_ids` must be in its vocabulary, and `min_tokens` must fit the completion budget. Each is a 400
naming the field.
"""

from __future__ import annotations

from app.engine.protocol import SamplingParams, SamplingParamsError, StructuredOutput
from app.errors import InvalidRequest
from app.protocol.common import SamplingFields, normalize_stop, parse_logit_bias


def _in_vocabulary(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"{param}: token id {bad} is outside the vocabulary [0, {vocab_size})", param=param)


def sampling_params(req: SamplingFields, *, candidates: int, max_tokens: int, logprobs: int | None,
                    vocab_size: int, structured: StructuredOutput | None = None) -> list[SamplingParams]:
    """One SamplingParams per candidate choice of one prompt; with a seed, choice i uses seed + i (distinct,
    reproducible, and the same for every prompt of a request, so a prompt answers as it would alone).

    `max_tokens` is the budget in force (the client's, or what fits the context when it gave none): a min_tokens
    above it is a 400 naming `min_tokens`, as vLLM checks it against the same budget."""
    bias = parse_logit_bias(req.logit_bias) if req.logit_bias else ()  # the wire model checked the keys already
    _in_vocabulary([t for t, _ in bias], vocab_size, "logit_bias")
    stop_ids = tuple(req.stop_token_ids or ())
    _in_vocabulary(list(stop_ids), vocab_size, "stop_token_ids")
    try:
        return [SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0),  # vLLM's -1 and 0 both mean off
            seed=None if req.seed is None else req.seed + i, stop=normalize_stop(req.stop), logprobs=logprobs,
            ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, structured=structured,
            min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=bias, stop_token_ids=stop_ids,
        ) for i in range(candidates)]
    except SamplingParamsError as exc:
        raise InvalidRequest(str(exc), param=str(exc).split(" ", 1)[0]) from None
