"""Exactness of the DFlash server where a request asks for more than plain greedy decoding.

Two real SGLang 0.5.23 CPU servers on the bundled tiny Qwen3 pair, both with a 256-token
context and custom logit processors enabled, shared by every test here: a plain one and a
DFlash one (overlap scheduling on, SGLang's default). Each test is a regression test of
one defect of issue 12:

1. requests that end in the last blocks before the context length (every prompt length
   from context - 2L to the context, and short prompts that generate up to it) answer as
   the plain server does, and leave no KV slot behind (SGLang's idle leak check would
   otherwise stop the server);
2. frequency, presence and repetition penalties, alone and together: greedy output equal
   to the plain server's token for token;
3. min_new_tokens, logit_bias and a custom logit processor that reads the output so far:
   the same;
4. sampled requests (top-k, top-p, min-p): every token lies in the support of the target's
   distribution at its position, as SGLang's sampler defines it, recomputed with the
   reference HF target.

The plain server runs with ``--disable-overlap-schedule``: with overlap on, SGLang's plain
server feeds its penalizers one token late (see ``sglang_dflash.worker.logits``), so its
penalised output is not the definition. Everything else is the same either way.
"""

from __future__ import annotations

import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from sglang_env import require_sglang

from sglang_dflash.dev.server import Server
from sglang_dflash.reference.tiny_pair import BOS, DEMO_PROMPTS, EOS, encode

require_sglang()
pytestmark = pytest.mark.slow

from sglang_dflash.reference.tiny_qwen3 import DRAFTER_DIR, TARGET_DIR  # noqa: E402

L = 16
CTX = 256
COMMON_ARGS = ("--max-total-tokens", "8192", "--max-running-requests", "16", "--sleep-on-idle",
               "--context-length", str(CTX), "--enable-custom-logit-processor")
SPEC_ARGS = ("--speculative-algorithm", "dflash", "--speculative-draft-model-path", str(DRAFTER_DIR))
CONCURRENCY = 8
MAX_NEW = 40


def corpus_prompts(n: int, seed: int = 11) -> list[list[int]]:
    from sglang_dflash.dev.train import synthetic_document

    import random

    rng = random.Random(seed)
    return [synthetic_document(rng)[: rng.randrange(8, 31)] for _ in range(n)]


def document_endings(n: int, seed: int = 5) -> list[list[int]]:
    """Corpus documents without their last 6 tokens: greedy decoding ends them in EOS soon."""
    from sglang_dflash.dev.train import synthetic_document

    import random

    rng = random.Random(seed)
    return [doc[:-6] for doc in (synthetic_document(rng) for _ in range(n))]


PROMPTS = [encode(p) for p in DEMO_PROMPTS] + corpus_prompts(4)
ENDINGS = document_endings(4)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(plain, dflash), started one after the other and kept for the module."""
    t0 = time.perf_counter()
    plain = Server(TARGET_DIR, tmp_path_factory.mktemp("plain") / "server.log",
                   COMMON_ARGS + ("--disable-overlap-schedule",))
    try:
        spec = Server(TARGET_DIR, tmp_path_factory.mktemp("dflash") / "server.log", COMMON_ARGS + SPEC_ARGS)
    except BaseException:
        plain.stop()
        raise
    print(f"\nstart-up: plain {plain.startup_s:.1f} s, dflash {spec.startup_s:.1f} s "
          f"({time.perf_counter() - t0:.1f} s)")
    assert "DFlash worker: drafter" in spec.log.read_text(), "the plugin's worker did not start"
    yield plain, spec
    spec.stop()
    plain.stop()


def answer(server: Server, ids: list[int], sampling: dict) -> tuple[int, list[int] | None]:
    """(HTTP status, output ids) of one /generate."""
    try:
        out, _ = server.post("/generate", {"input_ids": ids, "sampling_params": sampling})
    except urllib.error.HTTPError as err:
        return err.code, None
    return 200, out["output_ids"]


def answer_all(server: Server, requests: list[tuple[list[int], dict]]) -> list[tuple[int, list[int] | None]]:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(lambda r: answer(server, *r), requests))


def greedy(**params) -> dict:
    return {"max_new_tokens": MAX_NEW, "temperature": 0, **params}


def assert_same_answers(servers, requests, what: str) -> list[tuple[int, list[int] | None]]:
    plain, spec = servers
    want, got = answer_all(plain, requests), answer_all(spec, requests)
    for (ids, params), w, g in zip(requests, want, got):
        assert g == w, f"{what}: prompt of {len(ids)} tokens, {params}"
    return got


def test_every_length_up_to_the_context(servers):
    """Defect 1: prompts of every length from CTX - 2L to CTX asking for the rest of the
    context, and short prompts generating up to it, several at a time (neighbouring
    request rows): the plain server's answers, no slot left behind."""
    count = [BOS] + list(("count: " + " ".join(str(i) for i in range(200))).encode())
    requests = [(count[:n], greedy(max_new_tokens=max(CTX - n, 1), ignore_eos=True))
                for n in range(CTX - 2 * L, CTX + 1)]
    requests += [(p, greedy(max_new_tokens=CTX - len(p), ignore_eos=True)) for p in PROMPTS[:4]]
    got = assert_same_answers(servers, requests, "near the context")
    served = [len(ids) + len(out) for (ids, _), (code, out) in zip(requests, got) if code == 200]
    # SGLang serves prompts up to CTX - 6 and caps the output at CTX - 2 tokens in all
    assert len(served) >= 2 * L - 5 and max(served) == CTX - 2, served

    # an OpenAI chat request without max_tokens runs to the context too
    def chat(server, text):
        body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "temperature": 0,
                "ignore_eos": True}
        out = server.post("/v1/chat/completions", body)[0]
        return out["choices"][0]["message"]["content"], out["usage"]

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        want = list(pool.map(lambda t: chat(servers[0], t), DEMO_PROMPTS[:4]))
        ours = list(pool.map(lambda t: chat(servers[1], t), DEMO_PROMPTS[:4]))
    assert ours == want
    assert all(u["prompt_tokens"] + u["completion_tokens"] == CTX - 2 for _, u in ours), ours
    assert_no_slot_held(servers[1])


PENALTIES = {
    "frequency": dict(frequency_penalty=1.5),
    "presence": dict(presence_penalty=1.2),
    "repetition": dict(repetition_penalty=1.6),
    "frequency-negative": dict(frequency_penalty=-0.4),
    "frequency-presence": dict(frequency_penalty=0.6, presence_penalty=0.5),
}
ALL_THREE = dict(frequency_penalty=0.6, presence_penalty=0.5, repetition_penalty=1.3)


def test_penalties_equal_the_plain_server(servers):
    """Defect 2: penalised greedy requests, token for token (and not the unpenalised output)."""
    requests = [(p, greedy(**params)) for params in PENALTIES.values() for p in PROMPTS]
    got = assert_same_answers(servers, requests, "penalties")
    unpenalised = answer_all(servers[0], [(p, greedy()) for p in PROMPTS])
    changed = sum(out != unpenalised[i % len(PROMPTS)][1] for i, (_, out) in enumerate(got))
    assert changed >= len(requests) // 2, f"only {changed} of {len(requests)} penalised outputs differ"


def reference_logits(target, ids: list[int]) -> torch.Tensor:
    """[T, V] fp32 logits of the reference HF target after each token of ids."""
    with torch.no_grad():
        return target.hf(torch.tensor([ids]), use_cache=False).logits[0].float()


def penalised(logits: torch.Tensor, output: list[int], p: dict, scaling_first: bool = False) -> torch.Tensor:
    """logits [V] after SGLang's penalties for the output so far: additive ones, then the
    repetition scaling (``SamplingBatchInfo.update_penalties``), or the other way round."""
    counts = torch.bincount(torch.tensor(output, dtype=torch.int64), minlength=logits.shape[0]).float()
    additive = -p["frequency_penalty"] * counts - p["presence_penalty"] * (counts > 0).float()
    scale = torch.where(counts > 0, p["repetition_penalty"], 1.0)
    rescale = lambda x: torch.where(x < 0, x * scale, x / scale)  # noqa: E731
    return rescale(logits) + additive if scaling_first else rescale(logits + additive)


def test_all_three_penalties_follow_the_definition(servers):
    """Defect 2, all three at once: every token is the argmax of the reference target's
    logits penalised in SGLang's order (additive, then repetition). The plain server is no
    oracle here: without overlap its penalizers run in the iteration order of a set of
    classes, which changes from one launch to the next, and with overlap they lag a token."""
    from sglang_dflash.reference.tiny_qwen3 import load_tiny_qwen3_pair

    got = answer_all(servers[1], [(p, greedy(**ALL_THREE)) for p in PROMPTS])
    target, _ = load_tiny_qwen3_pair()
    other_order = 0
    for prompt, (code, out) in zip(PROMPTS, got):
        assert code == 200
        logits = reference_logits(target, prompt + out)[len(prompt) - 1:]
        for t, token in enumerate(out):
            want = penalised(logits[t], out[:t], ALL_THREE)
            assert want[token] >= want.max() - 1e-3, f"prompt {prompt}: token {t} is {token}, not the argmax"
            swapped = penalised(logits[t], out[:t], ALL_THREE, scaling_first=True)
            other_order += bool(swapped[token] < swapped.max() - 1e-3)
    assert other_order > 0, "the other penalty order gives the same tokens: the check sees no order"


def test_min_new_tokens_equal_the_plain_server(servers):
    """Defect 3: min_new_tokens holds the stop tokens back at every block position below
    the minimum (prompts whose greedy output ends early)."""
    plain, _ = servers
    free = answer_all(plain, [(p, greedy()) for p in PROMPTS + ENDINGS])
    early = sum(out[-1] == EOS and len(out) < 30 for _, out in free)
    assert early >= 3, "too few prompts end early: min_new_tokens would not be exercised"
    requests = [(p, greedy(min_new_tokens=30)) for p in PROMPTS + ENDINGS]
    got = assert_same_answers(servers, requests, "min_new_tokens")
    assert all(len(out) >= 30 for _, out in got)


def test_logit_bias_equals_the_plain_server(servers):
    bias = {str(ord(" ")): -4.0, str(EOS): 3.0, str(ord("1")): 1.5}
    got = assert_same_answers(servers, [(p, greedy(logit_bias=bias)) for p in PROMPTS], "logit_bias")
    free = answer_all(servers[0], [(p, greedy()) for p in PROMPTS])
    assert sum(g != f for g, f in zip(got, free)) >= len(PROMPTS) // 2, "the bias changed nothing"


def test_custom_processor_reading_the_output_equals_the_plain_server(servers):
    """A custom logit processor that reads the output so far (SGLang's no-repeat n-gram
    processor) sees, at each block position, the output plus the candidates before it."""
    from sglang.srt.sampling.custom_logit_processor import DeepseekOCRNoRepeatNGramLogitProcessor

    processor = DeepseekOCRNoRepeatNGramLogitProcessor.to_str()
    body = lambda p: {"input_ids": p, "custom_logit_processor": processor,  # noqa: E731
                      "sampling_params": greedy(custom_params={"ngram_size": 2, "window_size": 64})}
    plain, spec = servers
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        want = list(pool.map(lambda p: plain.post("/generate", body(p))[0]["output_ids"], PROMPTS))
        ours = list(pool.map(lambda p: spec.post("/generate", body(p))[0]["output_ids"], PROMPTS))
    assert ours == want
    free = answer_all(plain, [(p, greedy()) for p in PROMPTS])
    assert sum(w != f for w, (_, f) in zip(want, free)) >= len(PROMPTS) // 2, "the processor changed nothing"


SAMPLED = {
    "T0.8-k5-p0.7": dict(temperature=0.8, top_k=5, top_p=0.7),
    "T1.0-p0.6": dict(temperature=1.0, top_p=0.6),
    "T0.9-k8-minp0.2": dict(temperature=0.9, top_k=8, min_p=0.2),
}


def outside_support(probs: torch.Tensor, token: int, top_k: int, top_p: float, min_p: float,
                    slack: float) -> bool:
    """Whether ``token`` lies outside SGLang's torch-sampler support of probs [V]: fewer than
    top_k tokens more likely, the mass of those <= top_p, p >= min_p x max; ``slack`` absorbs
    the float difference between the server's logits and the reference target's."""
    p = probs[token]
    above = probs > p + slack
    return bool(int(above.sum()) >= top_k or float(probs[above].sum()) > top_p + slack
                or float(p) < min_p * float(probs.max()) - slack)


def test_sampled_tokens_lie_in_the_targets_support(servers):
    """Defect 4 on the server: each sampled token is allowed by top-k / top-p / min-p at its
    position (and the check sees tokens a greedy sampler would not have chosen)."""
    from sglang_dflash.reference.tiny_qwen3 import load_tiny_qwen3_pair

    _, spec = servers
    requests = [(p, {"max_new_tokens": MAX_NEW, "ignore_eos": True, **params})
                for params in SAMPLED.values() for p in PROMPTS]
    got = answer_all(spec, requests)
    target, _ = load_tiny_qwen3_pair()
    checked = not_argmax = 0
    for (prompt, params), (code, out) in zip(requests, got):
        assert code == 200 and len(out) == MAX_NEW
        logits = reference_logits(target, prompt + out)[len(prompt) - 1: -1]
        probs = torch.softmax(logits / params["temperature"], dim=-1)
        for j, token in enumerate(out):
            bad = outside_support(probs[j], token, params.get("top_k", 1 << 30), params.get("top_p", 1.0),
                                  params.get("min_p", 0.0), slack=1e-4)
            assert not bad, f"{params}: token {j} ({token}) outside the support, probs {probs[j].topk(8)}"
            not_argmax += token != int(probs[j].argmax())
            checked += 1
    print(f"\n{checked} sampled tokens in the support, {not_argmax} of them not the argmax")
    assert not_argmax > checked // 10, "the samples look greedy: the check would see nothing"


def assert_no_slot_held(server: Server) -> None:
    deadline = time.monotonic() + 120
    while server.get("/v1/loads")["loads"][0]["num_running_reqs"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.post_text("/flush_cache", {})[0].startswith("Cache flushed")
    load = server.get("/v1/loads")["loads"][0]
    assert load["num_used_tokens"] == 0, load
    assert server.proc.poll() is None
    assert "memory leak detected" not in server.log.read_text()


def test_no_kv_slot_leaked(servers):
    """Last: after everything above, the DFlash server is alive and holds no slot."""
    assert_no_slot_held(servers[1])
