"""Malformed requests for the tiny Qwen3 target (vocab 264, context 2048), shared by tests.

``REFUSED_BY_PLUGIN``: what a stock SGLang 0.5.23 server dies of or misserves, each with the
words the plugin's 400 must contain. ``REFUSED_BY_SGLANG``: what stock SGLang already
answers with a 4xx (the plugin leaves them alone). ``STILL_SERVED``: the valid edge of each
checked range, which must keep working.
"""

from __future__ import annotations

PROMPT = [256, 99, 111, 117, 110, 116, 58, 32]  # "<bos>count: "
VOCAB = 264


def generate(ids=PROMPT, top=None, **sampling) -> tuple[str, dict]:
    """/generate with ``input_ids``; ``top`` holds request fields beside sampling_params."""
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0, **sampling}}
    return "/generate", {**body, **(top or {})}


def completion(prompt=PROMPT, **fields) -> tuple[str, dict]:
    return "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0,
                               **fields}


def chat(**fields) -> tuple[str, dict]:
    return "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "count: 1 2"}],
                                    "max_tokens": 4, "temperature": 0, **fields}


LOGPROBS = {"return_logprob": True}

# name -> ((path, body), words the 400's message must contain)
REFUSED_BY_PLUGIN = {
    "top_logprobs_num-100000": (generate(top={**LOGPROBS, "top_logprobs_num": 100000}),
                                ("top_logprobs_num", "100000", "[0, 264]")),
    "top_logprobs_num-265": (generate(top={**LOGPROBS, "top_logprobs_num": 265}), ("top_logprobs_num", "265")),
    "top_logprobs_num-neg": (generate(top={**LOGPROBS, "top_logprobs_num": -1}), ("top_logprobs_num", "-1")),
    "input_ids-99999": (generate([256, 99999]), ("input_ids", "99999", "index 1", "[0, 264)")),
    "input_ids-neg": (generate([256, 104, -1]), ("input_ids", "-1", "index 2", "[0, 264)")),
    "input_ids-264": (generate([256, 264]), ("input_ids", "264", "[0, 264)")),
    "input_ids-batch": (generate([[256, 104], [256, 99999]]), ("input_ids", "99999")),
    "completion-ids-5000": (completion([256, 5000]), ("input_ids", "5000", "[0, 264)")),
    "completion-ids-264": (completion([256, 264]), ("input_ids", "264")),
    "completion-ids-neg": (completion([256, -1]), ("input_ids", "-1")),
    "completion-batch-5000": (completion([[256, 104], [5000]]), ("input_ids", "5000")),
    "completion-stream-5000": (completion([256, 5000], stream=True), ("input_ids", "5000")),
    "completion-logprobs-100000": (completion(logprobs=100000), ("top_logprobs_num", "100000")),
    "completion-logprobs-neg": (completion(logprobs=-1), ("top_logprobs_num", "-1")),
    "chat-top_logprobs-100000": (chat(logprobs=True, top_logprobs=100000), ("top_logprobs_num", "100000")),
    "n-0": (generate(n=0), ("n must be", "0")),
    "n-neg": (generate(n=-1), ("n must be", "-1")),
    "n-0-batch": (generate([PROMPT, PROMPT], n=0), ("n must be", "0")),
    "completion-n-0": (completion(n=0), ("n must be", "0")),
    "completion-n-neg": (completion(n=-1), ("n must be", "-1")),
    "chat-n-0": (chat(n=0), ("n must be", "0")),
    "chat-n-neg": (chat(n=-1), ("n must be", "-1")),
    "stop_token_ids-5000": (generate(stop_token_ids=[5000]), ("stop_token_ids", "5000", "[0, 264)")),
    "stop_token_ids-neg": (generate(stop_token_ids=[-1]), ("stop_token_ids", "-1")),
    "stop_token_ids-5000-min_new": (generate(stop_token_ids=[5000], min_new_tokens=2), ("stop_token_ids", "5000")),
    "stop_token_ids-neg-min_new": (generate(stop_token_ids=[-1], min_new_tokens=2), ("stop_token_ids", "-1")),
    "completion-stop_token_ids-5000": (completion(stop_token_ids=[5000]), ("stop_token_ids", "5000")),
    "chat-stop_token_ids-5000-min": (chat(stop_token_ids=[5000], min_tokens=2), ("stop_token_ids", "5000")),
    "logprob_start_len-neg": (generate(top={**LOGPROBS, "logprob_start_len": -5}), ("logprob_start_len", "-5")),
    "stop_regex-unbalanced": (generate(stop_regex="("), ("stop_regex", "'('", "not a valid regular expression")),
    "stop-empty": (generate(stop=[""]), ("empty stop string",)),
}

# name -> (path, body): a 4xx from SGLang itself, with or without the plugin
REFUSED_BY_SGLANG = {
    "input_ids-empty": generate([]),
    "input_ids-float": generate([256, 1.5]),
    "max_new_tokens-neg": generate(max_new_tokens=-1),
    "max_new_tokens-huge": generate(max_new_tokens=10**9),
    "top_k-0": generate(top_k=0, temperature=0.7),
    "top_p-0": generate(top_p=0.0, temperature=0.7),
    "top_p-1.5": generate(top_p=1.5, temperature=0.7),
    "min_p-neg": generate(min_p=-0.1, temperature=0.7),
    "temperature-neg": generate(temperature=-1),
    "frequency_penalty-5": generate(frequency_penalty=5),
    "repetition_penalty-0": generate(repetition_penalty=0),
    "min_new_tokens-above-max": generate(min_new_tokens=10, max_new_tokens=4),
    "logit_bias-5000": generate(logit_bias={"5000": 1.0}),
    "token_ids_logprob-5000": generate(top={**LOGPROBS, "token_ids_logprob": [5000]}),
    "logprob_start_len-past-prompt": generate(top={**LOGPROBS, "logprob_start_len": 1000}),
    "context-2048": generate([256] + [104] * 2047),
    "context-2040+20": generate([256] + [104] * 2039, max_new_tokens=20),
    "regex-unbalanced": generate(regex="("),
    "completion-empty": completion([]),
    "completion-max_tokens-neg": completion(max_tokens=-1),
    "completion-top_k-0": completion(top_k=0, temperature=0.7),
    "chat-max_tokens-neg": chat(max_tokens=-1),
}

# name -> (path, body): the valid edge of each range the plugin checks
STILL_SERVED = {
    "top_logprobs_num-264": generate(top={**LOGPROBS, "top_logprobs_num": 264}),
    "input_ids-263": generate([256, 263]),
    "n-2": generate(n=2),
    "stop_token_ids-257-min_new": generate(stop_token_ids=[257], min_new_tokens=2),
    "logprob_start_len-0": generate(top={**LOGPROBS, "logprob_start_len": 0}),
    "stop_regex-digit": generate(stop_regex=r"\d"),
    "completion-logprobs-2": completion(logprobs=2),
    "chat-n-2": chat(n=2),
}
