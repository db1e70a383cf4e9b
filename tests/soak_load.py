"""The soak test's load: a seeded mix of requests, run against one server, with outcomes.

``soak_cases(seed)`` builds the mix (every kind the soak covers, listed in ``KINDS``);
``run_cases(server, cases)`` sends them ``CONCURRENCY`` at a time and returns one
``Outcome`` per case, in case order. Answers are reduced to what the oracle compares
(``normalize``): token ids or text, finish reasons, logprobs; never ids or timings.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from request_cases import REFUSED_BY_PLUGIN, REFUSED_BY_SGLANG

from sglang_dflash.reference.tiny_pair import BOS, EOS

CONTEXT = 2048
# SGLang 0.5.23 refuses prompts of context - 6 tokens and more (tp_worker max_req_input_len)
MAX_PROMPT = CONTEXT - 7
DRAFTER_POSITIONS = 512
CONCURRENCY = 12
TIMEOUT_S = 180
# around the verify width (6) and the draft block (16)
EDGE_MAX_NEW = (1, 2, 5, 6, 7, 15, 16, 17)
# kinds whose greedy output must equal the plain server's, token for token
GREEDY_KINDS = ("generate", "stream", "logprobs", "stop_str", "stop_ids", "n_greedy", "penalty",
                "min_new", "completion", "chat", "long_prompt", "context_end")
KINDS = GREEDY_KINDS + ("sampled", "hang_up", "abort", "malformed")


@dataclass(frozen=True)
class Case:
    kind: str
    path: str
    body: dict
    mode: str = "json"  # json | stream | hang_up | abort
    max_new: int = 0  # for the validity checks of sampled answers


@dataclass
class Outcome:
    status: int  # HTTP status; -1: no answer (connection refused, reset, timeout)
    answer: object = None  # normalize()'s reduction; None when not 200
    seconds: float = 0.0
    error: str = ""
    raw: list = field(default_factory=list)


def prompt_ids(rng: random.Random, length: int) -> list[int]:
    """BOS and ``length - 1`` bytes of corpus documents (what the pair was trained on)."""
    from sglang_dflash.dev.train import synthetic_document

    ids = [BOS]
    while len(ids) < length:
        ids += [t for t in synthetic_document(rng) if t not in (BOS, EOS)] + [ord("\n")]
    return ids[:length]


def text_of(ids: list[int]) -> str:
    return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace")


def _generate(ids, max_new, stream=False, top=None, **sampling) -> tuple[str, dict]:
    body = {"input_ids": ids, "stream": stream,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0, **sampling}}
    return "/generate", {**body, **(top or {})}


def _openai(path: str, rng: random.Random, ids: list[int], max_new: int, **fields) -> tuple[str, dict]:
    body = {"model": "tiny", "max_tokens": max_new, "temperature": 0, **fields}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": text_of(ids[1:]) or "count:"}]
    else:
        # token ids or text (the tokenizer adds BOS itself; an empty text is refused)
        body["prompt"] = ids if rng.random() < 0.5 or len(ids) == 1 else text_of(ids[1:])
    return path, body


def _short_len(rng: random.Random) -> int:
    return rng.choice([1, 2, 3, 8, 15, 16, 17, 24, 40, 64, 120, 200, 511, 512, 513])


def _max_new(rng: random.Random) -> int:
    """max_new_tokens: the block edges, mostly short, some up to 200 (CI time)."""
    draw = rng.random()
    if draw < 0.4:
        return rng.choice(EDGE_MAX_NEW)
    return rng.randrange(3, 64) if draw < 0.85 else rng.randrange(64, 201)


def _greedy_case(kind: str, rng: random.Random) -> Case:
    ids, n = prompt_ids(rng, _short_len(rng)), _max_new(rng)
    if kind == "generate":
        return Case(kind, *_generate(ids, n, ignore_eos=rng.random() < 0.2))
    if kind == "stream":
        return Case(kind, *_generate(ids, n, stream=True), mode="stream")
    if kind == "logprobs":
        top = {"return_logprob": True, "top_logprobs_num": rng.randrange(0, 6),
               "logprob_start_len": rng.choice([-1, 0, len(ids) - 1])}
        return Case(kind, *_generate(ids, min(n, 40), top=top))
    if kind == "stop_str":
        return Case(kind, *_generate(ids, n, stop=rng.sample([" ", "\n", ";", "=", "1", "at", " the"], 2)))
    if kind == "stop_ids":
        return Case(kind, *_generate(ids, n, stop_token_ids=[ord(c) for c in rng.sample(" \n;=15", 2)]))
    if kind == "n_greedy":
        return Case(kind, *_generate(ids, min(n, 60), n=rng.choice([2, 3])))
    if kind == "penalty":
        name = rng.choice(["repetition_penalty", "frequency_penalty", "presence_penalty"])
        value = {"repetition_penalty": 1.3}.get(name, rng.choice([0.5, 1.0, -0.5]))
        return Case(kind, *_generate(ids, max(n, 24), **{name: value}))
    if kind == "min_new":
        return Case(kind, *_generate(prompt_ids(rng, rng.randrange(8, 40)), 60,
                                     min_new_tokens=rng.choice([5, 20, 40])))
    if kind in ("completion", "chat"):
        path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
        stream = rng.random() < 0.5
        extra = {"logprobs": rng.randrange(1, 4)} if kind == "completion" and not stream and rng.random() < 0.3 else {}
        stop = {"stop": ["\n"]} if rng.random() < 0.3 else {}
        return Case(kind, *_openai(path, rng, ids, min(n, 80), stream=stream, **extra, **stop),
                    mode="stream" if stream else "json")
    if kind == "long_prompt":
        return Case(kind, *_generate(prompt_ids(rng, rng.randrange(DRAFTER_POSITIONS + 1, 1900)),
                                     rng.choice([8, 16, 17, 40])))
    if kind == "context_end":
        # prompt + max_new = the context length, or ends inside the last block before it
        end = CONTEXT - rng.choice([0, 0, 3, 9, 15])
        prompt = min(end - rng.choice([1, 8, 16, 31, 40, 148]), MAX_PROMPT)
        return Case(kind, *_generate(prompt_ids(rng, prompt), end - prompt, ignore_eos=True))
    raise ValueError(kind)


def _sampled_case(rng: random.Random) -> Case:
    ids, n = prompt_ids(rng, _short_len(rng)), _max_new(rng)
    sampling = {"temperature": rng.choice([0.6, 1.0, 1.3]), "top_p": rng.choice([1.0, 0.9, 0.5]),
                "top_k": rng.choice([-1, 1, 5, 40]), "min_p": rng.choice([0.0, 0.05])}
    if rng.random() < 0.25:
        sampling["n"] = 2
    stream = "n" not in sampling and rng.random() < 0.3
    return Case("sampled", *_generate(ids, n, stream=stream, **sampling), mode="stream" if stream else "json",
                max_new=n)


def soak_cases(seed: int = 12) -> list[Case]:
    """The whole mix (353 requests), shuffled."""
    rng = random.Random(seed)
    counts = {"generate": 80, "stream": 25, "logprobs": 20, "stop_str": 14, "stop_ids": 14, "n_greedy": 8,
              "penalty": 12, "min_new": 12, "completion": 30, "chat": 20, "long_prompt": 15,
              "context_end": 8, "sampled": 30, "hang_up": 6, "abort": 6}
    cases = [_greedy_case(kind, rng) for kind in GREEDY_KINDS for _ in range(counts[kind])]
    cases += [_sampled_case(rng) for _ in range(counts["sampled"])]
    for mode in ("hang_up", "abort"):
        cases += [Case(mode, *_generate(prompt_ids(rng, rng.randrange(8, 300)), 400, ignore_eos=True,
                                        stream=mode == "hang_up"), mode=mode) for _ in range(counts[mode])]
    malformed = [case for case, _ in REFUSED_BY_PLUGIN.values()] + list(REFUSED_BY_SGLANG.values())
    cases += [Case("malformed", path, body) for path, body in malformed]
    rng.shuffle(cases)
    return cases


# ---- sending ----


def _post(port: int, path: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def _events(resp) -> list[dict]:
    out = []
    for line in resp.read().decode().splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            out.append(json.loads(line[5:]))
    return out


def _abort_after(port: int, rid: str, delay: float) -> None:
    time.sleep(delay)
    conn, resp = _post(port, "/abort_request", {"rid": rid})
    resp.read()
    conn.close()


def send(port: int, case: Case, index: int) -> Outcome:
    t0 = time.perf_counter()
    body = case.body
    try:
        if case.mode == "abort":
            body = {**body, "rid": f"soak-abort-{index}-{time.monotonic_ns()}"}
            threading.Thread(target=_abort_after, args=(port, body["rid"], 0.3), daemon=True).start()
        conn, resp = _post(port, case.path, body)
        try:
            if case.mode == "hang_up":
                # read a few events, then close the connection mid-stream
                seen = 0
                while seen < 3 and (line := resp.readline()):
                    seen += line.startswith(b"data:")
                return Outcome(resp.status, seen, time.perf_counter() - t0)
            if resp.status != 200:
                return Outcome(resp.status, None, time.perf_counter() - t0, resp.read().decode()[:300])
            raw = _events(resp) if case.mode == "stream" else [json.loads(resp.read())]
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
        return Outcome(-1, None, time.perf_counter() - t0, repr(e)[:300])
    return Outcome(200, normalize(case, raw), time.perf_counter() - t0, raw=raw)


def run_cases(port: int, cases: list[Case]) -> list[Outcome]:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(send, [port] * len(cases), cases, range(len(cases))))


# ---- what the oracle compares ----


def _finish(reason) -> object:
    return {k: v for k, v in reason.items() if k != "message"} if isinstance(reason, dict) else reason


def _native(answer: dict) -> dict:
    meta = answer["meta_info"]
    out = {"ids": answer["output_ids"], "finish": _finish(meta["finish_reason"])}
    for key in ("output_token_logprobs", "input_token_logprobs", "output_top_logprobs"):
        if meta.get(key) is not None:
            out[key] = meta[key]
    return out


def normalize(case: Case, raw: list) -> object:
    if not raw:
        return None
    if case.path == "/generate":
        if case.mode == "stream":
            # each event carries the output so far (SGLang's default, non-incremental streaming)
            return [_native(raw[-1])] if "error" not in raw[-1] else raw[-1]
        return [_native(a) for a in (raw[0] if isinstance(raw[0], list) else [raw[0]])]
    choices: dict[int, dict] = {}
    for event in raw:
        for choice in event.get("choices", []):
            into = choices.setdefault(choice["index"], {"text": "", "finish": None})
            piece = choice.get("text") or (choice.get("message") or choice.get("delta") or {}).get("content")
            into["text"] += piece or ""
            into["finish"] = choice.get("finish_reason") or into["finish"]
            if choice.get("logprobs") and case.mode == "json":
                into["logprobs"] = choice["logprobs"]
    return [choices[i] for i in sorted(choices)]
