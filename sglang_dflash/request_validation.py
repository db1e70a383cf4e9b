"""Request checks that SGLang 0.5.23 lacks: fields it passes on to the scheduler unchecked.

Every check here answers a request that a stock 0.5.23 server (tiny Qwen3 target, vocab
264, on CPU) either dies of or serves as something the client did not ask for; what SGLang
already refuses with a clean 400 (temperature, top_p, top_k, min_p, penalties,
max_new_tokens, logit_bias, token_ids_logprob, the context length) is left to it:

- a prompt token id outside the vocabulary: ``< 0`` or past the padded embedding kills the
  scheduler (IndexError in the embedding); ids between the vocabulary and the padded
  embedding (264..319 here) are served from untrained padding rows;
- ``top_logprobs_num`` above the vocabulary kills the scheduler (``topk`` out of range in
  ``logprob_processor.get_top_logprobs_raw``); a negative one is ignored;
- a ``stop_token_ids`` entry outside the vocabulary kills the scheduler together with
  ``min_new_tokens`` (the penalizer scatters it into a vocabulary-sized row) and is
  ignored without it;
- ``n`` below 1 is served as ``n = 1``, and a batch prompt with ``n = 0`` gets a bare 500;
- ``logprob_start_len`` below -1 (-1 means "no prompt logprobs") is ignored for a 3-token
  prompt and kills the scheduler for an 8-token one (-5);
- a ``stop_regex`` that does not compile is answered with a bare 500;
- an empty stop string ends every request after its first token.

``plugin.py`` calls ``check_request`` from SGLang's per-request validation and
``check_parallel_sample_num`` from its request normalisation; SGLang turns the
``ValueError`` into an HTTP 400 whose message is ours. Each message names the field, the
bad value and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def check_parallel_sample_num(n) -> None:
    """``n`` (parallel samples per prompt, after SGLang's normalisation) must be >= 1."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (samples per prompt), got {n!r}")


def check_request(obj, input_ids: list[int] | None, vocab_size: int) -> None:
    """Raise ValueError for the first field of one generate request SGLang would mishandle.

    ``obj`` is one normalised ``GenerateReqInput`` (a single request or one item of a batch)
    and ``input_ids`` its prompt token ids (None for embeddings input).
    """
    if input_ids is not None:
        check_token_ids("input_ids (the prompt's token ids)", input_ids, vocab_size)
    if obj.return_logprob:
        check_logprob_fields(obj.top_logprobs_num, obj.logprob_start_len, vocab_size)
    check_sampling_params(obj.sampling_params or {}, vocab_size)


def check_token_ids(field: str, ids: Iterable[int], vocab_size: int) -> None:
    """Every id an int in [0, vocab_size); the message names the first one that is not."""
    ids = list(ids)
    if ids and all(type(t) is int for t in ids) and 0 <= min(ids) and max(ids) < vocab_size:
        return
    for i, t in enumerate(ids):
        if type(t) is not int or not 0 <= t < vocab_size:
            raise ValueError(f"{field}: token id {t!r} at index {i} is outside the model's "
                             f"vocabulary; token ids must be integers in [0, {vocab_size})")


def check_logprob_fields(top_logprobs_num, logprob_start_len, vocab_size: int) -> None:
    if top_logprobs_num is not None and not 0 <= top_logprobs_num <= vocab_size:
        raise ValueError(f"top_logprobs_num (logprobs / top_logprobs in the OpenAI API) must be "
                         f"in [0, {vocab_size}] (the vocabulary size), got {top_logprobs_num}")
    if logprob_start_len is not None and logprob_start_len < -1:
        raise ValueError(f"logprob_start_len must be -1 (no prompt logprobs) or a prompt "
                         f"position >= 0, got {logprob_start_len}")


def check_sampling_params(params: dict, vocab_size: int) -> None:
    stop_ids = params.get("stop_token_ids")
    if stop_ids:
        # SGLang drops None entries itself
        check_token_ids("stop_token_ids", [t for t in stop_ids if t is not None], vocab_size)
    stops = params.get("stop")
    for stop in [stops] if isinstance(stops, str) else stops or []:
        if stop == "":
            raise ValueError("stop: an empty stop string would end the output after its first "
                             "token; stop strings must be non-empty")
    regexes = params.get("stop_regex")
    for pattern in [regexes] if isinstance(regexes, str) else regexes or []:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"stop_regex {pattern!r} is not a valid regular expression: {e}") from None
