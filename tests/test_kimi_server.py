"""SGLang's own Kimi-Linear through `sglang serve` on CPU: plain vs DFlash, three commits.

The bundled tiny Kimi-Linear target (KDA + absorbed MLA + MoE, served by SGLang 0.5.23's
``KimiLinearForCausalLM`` with the dev shims of ``sglang_dflash.dev.kimi_shims``) and the
tiny DFlash drafter, fp32. The session's plain server (``plain_servers``) answers
everything first; then one DFlash server per way of committing the KDA state after a
verify, one at a time beside the idle plain server:

- ``intermediate``: SGLang's verify keeps every block step's state and scatters the
  accepted one (the default), with the mamba pool capped at 6 slots;
- ``replayssm``: ``--enable-linear-replayssm-spec``, the verify writes a ring of its inputs
  and the commit replays the accepted prefix; this one verifies W = 6 of the 16 drafted
  positions (``--speculative-num-draft-tokens 6``), the others all 16;
- ``radix``: radix caching of linear state (``no_buffer``), with real prefix hits.

Every DFlash answer must equal the plain one; every request's verify steps must be the
teacher-forced walk ("draft 16, verify W") of the pair over the plain greedy continuation (count, histogram of
accepted drafts, tokens); the plain server itself must serve the reference target's
greedy tokens, also for requests ending in the last two blocks before the context length
(512 here). The mamba state pool is read while requests run: one slot per running
DFlash request in every configuration, and as many requests at once as SGLang's
``max_mamba_cache_size // slots-per-request`` rule allows. After each server: no KV slot
held after a flush, every mamba state slot free again (counted through the dev
``/server_info`` readout of ``kimi_shims``), no traceback in its log. Each server's
workload runs in one fixture; the tests assert on what it collected.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from plain_servers import KIMI_COMMON_ARGS, KIMI_CTX
from sglang_env import require_sglang

from sglang_dflash.dev.server import Server
from sglang_dflash.reference.tiny_pair import BOS, DEMO_PROMPTS, DRAFTER_DIR, EOS, TARGET_DIR, VOCAB_SIZE, encode

require_sglang()
pytestmark = pytest.mark.slow

BLOCK = 16
CONCURRENCY = 8
MAX_NEW = 40  # not a multiple of the block: a last step cut by max_new_tokens
CTX = KIMI_CTX
COMMON_ARGS = KIMI_COMMON_ARGS  # the session's plain server has these + --disable-radix-cache
SPEC_ARGS = ("--speculative-algorithm", "dflash", "--speculative-draft-model-path", str(DRAFTER_DIR))
CONFIGS = {
    "intermediate": ("--disable-radix-cache", "--max-mamba-cache-size", "6"),
    "replayssm": ("--disable-radix-cache", "--enable-linear-replayssm-spec", "--linear-replayssm-cache-len", "32",
                  "--speculative-num-draft-tokens", "6"),
    # room for the states the radix cache keeps, so that the prompts below still hit
    "radix": ("--mamba-radix-cache-strategy", "no_buffer", "--disable-overlap-schedule",
              "--max-mamba-cache-size", "45"),
}
# the verify width W of each: the drafter drafts its block of 16, the target verifies the
# first W positions (``--speculative-num-draft-tokens``)
WIDTH = {"intermediate": BLOCK, "replayssm": 6, "radix": BLOCK}
# requests SGLang runs at once for a given --max-mamba-cache-size: the pool divided by its
# slots per request, 1 without radix cache and 3 with it (kv_cache_configurator.py,
# resolve_max_num_reqs / _calculate_mamba_ratio); with neither, --max-running-requests
RUNNING_CAP = {"intermediate": 6, "replayssm": 16, "radix": 45 // 3}
STOP_CASES = [("count: 3 4 5 6", {"stop": [" 12"]}), ("12+7=19; 30+4=", {"stop": [";"]}),
              ("a red fox runs to the", {"stop": ["."]}), ("count: 41 42", {"max_tokens": 21})]
CHATS = ("count: 5 6 7", "3+4=7; 10+10=")
# prompts that start with a whole earlier prompt (of the later ones: a full pool evicts the
# least recently used states first): the radix cache holds that prompt's state
PREFIX_BASES = (13, 16, 20, 23)
PREFIX_SUFFIX = list(b" and then")


def corpus_prompts(n: int, seed: int = 11) -> list[list[int]]:
    """Prefixes (8..30 tokens, BOS first) of documents from the pair's training corpus."""
    from sglang_dflash.dev.train import synthetic_document

    rng = random.Random(seed)
    return [synthetic_document(rng)[: rng.randrange(8, 31)] for _ in range(n)]


PROMPTS = [encode(p) for p in DEMO_PROMPTS] + corpus_prompts(18)
# prompts of every length from CTX - 2 x BLOCK to CTX asking for the rest of the context (the
# verify reserves 2 blocks past the committed length), and short prompts generating up to it
_COUNT = [BOS] + list(("count: " + " ".join(str(i) for i in range(200))).encode())
NEAR_CONTEXT = [(_COUNT[:n], {"max_new_tokens": max(CTX - n, 1), "temperature": 0, "ignore_eos": True})
                for n in range(CTX - 2 * BLOCK, CTX + 1)]
NEAR_CONTEXT += [(p, {"max_new_tokens": CTX - len(p), "temperature": 0, "ignore_eos": True}) for p in PROMPTS[:2]]
PREFIX_PROMPTS = [PROMPTS[i] + PREFIX_SUFFIX for i in PREFIX_BASES]


def answer_all(server: Server, requests) -> list[tuple[int, list[int] | None]]:
    """(status, output ids) of each (input ids, sampling params) request, a refusal included."""
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(lambda r: server.answer(*r), requests))


def generate_all(server: Server, prompts, n: int, **params) -> list[dict]:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(lambda ids: server.generate(ids, n, **params)[0], prompts))


def completion(server: Server, prompt: str, **body) -> dict:
    body = {"model": "tiny", "prompt": [BOS] + list(prompt.encode()), "temperature": 0, **body}
    return server.post("/v1/completions", body)[0]


def chat(server: Server, content: str) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 32,
            "temperature": 0}
    return server.post("/v1/chat/completions", body)[0]


def slots(server: Server) -> dict:
    """The mamba state pool now (``kimi_shims.mamba_slot_counts``)."""
    return server.get("/server_info")["internal_states"][0]["dev_mamba_slots"]


def flushed_state(server: Server) -> tuple[int, dict]:
    """(KV slots in use, the mamba pool) once idle and with the radix cache flushed."""
    server.wait_idle()
    assert server.post_text("/flush_cache", {})[0].startswith("Cache flushed")
    server.wait_idle()
    return server.get("/v1/loads")["loads"][0]["num_used_tokens"], slots(server)


def sample_slots_while(server: Server, work) -> list[dict]:
    """The mamba pool read back-to-back while ``work()`` runs."""
    done, samples = threading.Event(), []

    def poll():
        while not done.is_set():
            samples.append(slots(server))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        work()
    finally:
        done.set()
        poller.join()
    return samples


def log_problems(text: str) -> list[str]:
    """Log records with a traceback, but for SGLang's own start-up race: with
    --skip-server-warmup it posts /freeze_gc before the HTTP port listens and logs the
    refusal with its traceback (srt/entrypoints/http_server.py, _freeze_gc_after_server_warmup)."""
    records = re.split(r"\n(?=\[\d{4}-\d\d-\d\d )", text)
    return [r[:600] for r in records if "Traceback" in r and "post-warmup freeze_gc failed" not in r]


@pytest.fixture(scope="module")
def plain(kimi_plain):
    """Everything the session's plain server answers, then its leak state."""
    srv = kimi_plain
    out = {"startup_s": srv.startup_s, "before": flushed_state(srv)}
    t0 = time.perf_counter()
    out["greedy"] = generate_all(srv, PROMPTS, MAX_NEW)
    out["greedy_s"] = time.perf_counter() - t0
    out["prefix"] = generate_all(srv, PREFIX_PROMPTS, MAX_NEW)
    out["completions"] = [completion(srv, p, **{"max_tokens": 48, **extra}) for p, extra in STOP_CASES]
    out["chats"] = [chat(srv, c) for c in CHATS]
    out["near_context"] = answer_all(srv, NEAR_CONTEXT)
    out["after"] = flushed_state(srv)
    out["log"] = srv.log.read_text(errors="replace")
    return out


def run_dflash_server(name: str, log) -> dict:
    srv = Server(TARGET_DIR, log, COMMON_ARGS + SPEC_ARGS + CONFIGS[name])
    try:
        out = {"startup_s": srv.startup_s, "before": flushed_state(srv)}
        out["cap"] = srv.get("/server_info")["internal_states"][0]["effective_max_running_requests_per_dp"]
        t0 = time.perf_counter()
        out["greedy"] = generate_all(srv, PROMPTS, MAX_NEW)
        out["greedy_s"] = time.perf_counter() - t0
        out["prefix"] = generate_all(srv, PREFIX_PROMPTS, MAX_NEW)
        out["completions"] = [completion(srv, p, **{"max_tokens": 48, **extra}) for p, extra in STOP_CASES]
        out["ignore_eos"] = completion(srv, "count: 41 42", max_tokens=21, ignore_eos=True)
        out["chats"] = [chat(srv, c) for c in CHATS]
        out["near_context"] = answer_all(srv, NEAR_CONTEXT)

        def mixed(i: int) -> dict:
            params = dict(temperature=0.8, top_p=0.9, ignore_eos=True) if i % 2 else {}
            return srv.generate(PROMPTS[i], 24, **params)[0]

        with ThreadPoolExecutor(8) as pool:
            out["mixed"] = list(pool.map(mixed, range(8)))
        srv.hang_up_mid_stream(PROMPTS[0], chunks=3, max_new_tokens=CTX - len(PROMPTS[0]))
        srv.wait_idle()
        out["after_hang_up"] = srv.generate(PROMPTS[1], 24)[0]
        # more requests than the pool may run at once, long enough to be read while running
        long_run = lambda: generate_all(srv, PROMPTS[:8], 48, ignore_eos=True)  # noqa: E731
        out["slot_samples"] = sample_slots_while(srv, long_run)
        out["after"] = flushed_state(srv)
        out["alive"] = srv.proc.poll() is None
        out["log"] = srv.log.read_text(errors="replace")
    finally:
        srv.stop()
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def served(request, plain, tmp_path_factory):
    """(config name, what its DFlash server answered)."""
    name = request.param
    return name, run_dflash_server(name, tmp_path_factory.mktemp(f"dflash-{name}") / "server.log")


@pytest.fixture(scope="module")
def walks(plain):
    """{W: the teacher-forced walk (commit_len per block) of "draft 16, verify W" over every
    plain greedy answer}."""
    from sglang_dflash.backend import get_ops
    from sglang_dflash.reference.offline import teacher_forced_commit_lens
    from sglang_dflash.reference.tiny_pair import load_tiny_pair

    target, drafter = load_tiny_pair()
    prompts, answers = PROMPTS + PREFIX_PROMPTS, plain["greedy"] + plain["prefix"]
    outputs = [a["output_ids"] for a in answers]
    return {W: dict(zip(map(tuple, prompts), teacher_forced_commit_lens(
        target, drafter, get_ops("torch"), prompts, outputs, BLOCK, W))) for W in set(WIDTH.values())}


def test_plain_server_serves_the_reference_target(plain):
    """Each plain greedy token is the reference target's argmax after the tokens before it."""
    import torch

    from sglang_dflash.reference.tiny_pair import load_tiny_pair

    print(f"\nplain: start-up {plain['startup_s']:.1f} s, 24 greedy requests {plain['greedy_s']:.1f} s")
    target, _ = load_tiny_pair()
    for ids, answer in zip(PROMPTS + PREFIX_PROMPTS, plain["greedy"] + plain["prefix"]):
        seq = ids + answer["output_ids"]
        with torch.no_grad():
            logits, _ = target.forward_train(torch.tensor([seq[:-1]]))
        assert logits[0, len(ids) - 1:].argmax(-1).tolist() == answer["output_ids"], f"prompt {ids}"
    reasons = [a["meta_info"]["finish_reason"]["type"] for a in plain["greedy"]]
    # both endings: EOS inside a block and max_new_tokens mid-block
    assert "stop" in reasons and "length" in reasons, reasons


def test_greedy_answers_equal_the_plain_server(served, plain):
    name, ours = served
    print(f"\n{name}: start-up {ours['startup_s']:.1f} s, 24 greedy requests {ours['greedy_s']:.1f} s")
    for key in ("greedy", "prefix"):
        for ids, b, o in zip(PROMPTS if key == "greedy" else PREFIX_PROMPTS, plain[key], ours[key]):
            assert o["output_ids"] == b["output_ids"], f"{name}: prompt {ids}"
            assert o["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
    eos_ended = [o for o in ours["greedy"] if o["meta_info"]["finish_reason"].get("matched") == EOS]
    assert eos_ended and all(o["output_ids"][-1] == EOS for o in eos_ended)


def test_verify_steps_are_the_teacher_forced_walk(served, walks):
    name, ours = served
    walks, cut_endings = walks[WIDTH[name]], set()
    for ids, o in zip(PROMPTS + PREFIX_PROMPTS, ours["greedy"] + ours["prefix"]):
        lens, meta = walks[tuple(ids)], o["meta_info"]
        # the server counts the token sampled by prefill too; the walk starts after it
        assert (meta["spec_verify_ct"], meta["completion_tokens"]) == (len(lens), sum(lens) + 1), \
            f"{name}: prompt {ids}: walk {lens}"
        # SGLang counts the accepted drafts of the last step before it cuts the step at EOS,
        # a stop or max_new_tokens; the walk counts what is kept: the other steps must match
        hist = meta["spec_correct_drafts_histogram"]
        left = Counter(dict(enumerate(hist))) - Counter(n - 1 for n in lens[:-1])
        assert sum(hist) == len(lens) and len(list(left.elements())) == 1 and min(left) >= lens[-1] - 1, \
            f"{name}: prompt {ids}: walk {lens}, accepted-drafts histogram {hist}"
        if min(left) > lens[-1] - 1:
            cut_endings.add(meta["finish_reason"]["type"])
    # both endings inside a block: EOS, and max_new_tokens, each cutting a verified block
    assert cut_endings == {"stop", "length"}, cut_endings
    steps, tokens = sum(len(walks[tuple(p)]) for p in PROMPTS), sum(sum(walks[tuple(p)]) for p in PROMPTS)
    served_len = sum(o["meta_info"]["completion_tokens"] for o in ours["greedy"]) / sum(
        o["meta_info"]["spec_verify_ct"] for o in ours["greedy"])
    assert max(n for lens in walks.values() for n in lens) == WIDTH[name], "no step used the whole width"
    print(f"\n{name} (W {WIDTH[name]}), 24 prompts: tau {tokens / steps:.3f} tokens per verify step over {steps} steps (first "
          f"token excluded); SGLang accept length {served_len:.3f}")


def test_prefix_hits_draft_the_same_blocks(served):
    """Prompts that start with an earlier whole prompt: with radix caching SGLang serves that
    prefix from the cache (the prompt's KDA state and its KV slots, hence their draft K/V);
    the walk test above shows the blocks drafted from it are the same."""
    name, ours = served
    cached = [o["meta_info"]["cached_tokens"] for o in ours["prefix"]]
    if name == "radix":
        assert cached == [len(PROMPTS[i]) for i in PREFIX_BASES], cached
    else:
        assert cached == [0] * len(cached), cached


def test_openai_completions_chat_and_stop_strings(served, plain):
    name, ours = served
    for case, b, o in zip(STOP_CASES, plain["completions"], ours["completions"]):
        assert o["choices"][0]["text"] == b["choices"][0]["text"], (name, case)
        assert o["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"], (name, case)
        assert o["usage"]["completion_tokens"] == b["usage"]["completion_tokens"], (name, case)
    assert ours["ignore_eos"]["usage"]["completion_tokens"] == 21
    for b, o in zip(plain["chats"], ours["chats"]):
        assert o["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"], name
        assert o["usage"] == b["usage"], name


def test_every_length_up_to_the_context(served, plain):
    """Requests that end in the last blocks before the context length: the plain server's
    answers (refusals included); the flush check of the last test finds no slot left."""
    name, ours = served
    for (ids, params), want, got in zip(NEAR_CONTEXT, plain["near_context"], ours["near_context"]):
        assert got == want, f"{name}: prompt of {len(ids)} tokens, {params}"
    ends = [len(ids) + len(out) for (ids, _), (code, out) in zip(NEAR_CONTEXT, ours["near_context"]) if code == 200]
    # most lengths are served, and some reach the last position SGLang lets a request fill
    assert len(ends) >= 2 * BLOCK - 5 and max(ends) >= CTX - 2, (name, ends)


def test_sampled_requests_beside_greedy_ones(served, plain):
    name, ours = served
    for i, (g, m) in enumerate(zip(plain["greedy"], ours["mixed"])):
        if i % 2:
            assert len(m["output_ids"]) == 24 and all(0 <= t < VOCAB_SIZE for t in m["output_ids"])
        else:
            assert m["output_ids"] == g["output_ids"][:24], f"{name}: greedy request {i} beside sampled ones"


def test_client_hang_up_leaves_the_server_exact(served, plain):
    name, ours = served
    assert ours["after_hang_up"]["output_ids"] == plain["greedy"][1]["output_ids"][:24], name


def test_one_state_slot_per_running_request(served):
    """A DFlash request holds one mamba pool slot; with radix caching SGLang also keeps a
    copy of the prompt's state in the tree, locked while the request runs ("protected").
    The per-step verify states live in a scratch of one row per request beside the pool
    (or a ring of inputs with ReplaySSM), so the pool alone caps how many requests run."""
    name, ours = served
    size, cap = ours["before"][1]["size"], RUNNING_CAP[name]
    assert ours["cap"] == cap, f"{name}: SGLang runs {ours['cap']} requests at once, expected {cap}"
    # (running requests, slots held by running requests, slots the tree locked for them)
    held = [(s["running"], s["size"] - s["available"] - s["evictable"] - s["protected"], s["protected"])
            for s in ours["slot_samples"]]
    running = min(CONCURRENCY, cap)
    tree_copy = int(name == "radix")
    assert (running, running, tree_copy * running) in held, f"{name}: samples {held}"
    assert max(r for r, _, _ in held) == running and max(h for _, h, _ in held) <= running, held
    assert max(p for _, _, p in held) == tree_copy * running, held
    scratch = ours["before"][1]
    if name == "replayssm":
        assert scratch["intermediate_ssm"] is None and scratch["replayssm_ring"][1] == 32, scratch
    else:
        # rows: SGLang sizes the scratch by the requests it may run, plus a padding row
        assert scratch["intermediate_ssm"] == [cap + 1, BLOCK], scratch
    print(f"\n{name}: pool {size} slots, 1 per running request (+{tree_copy} locked radix copy), {cap} "
          f"requests at once; verify scratch {scratch['intermediate_ssm'] or scratch['replayssm_ring']} "
          "(rows, steps)")


MHA_DRAFTER = TARGET_DIR.parent / "tiny-dflash-mha"


@pytest.fixture(scope="module")
def mha_triton(tmp_path_factory):
    """The MHA drafter (4 x head dim 24: every kernel's masked head-dim path) served with
    the Triton kernels (in the interpreter) instead of the torch twins: the demo prompts."""
    spec = ("--speculative-algorithm", "dflash", "--speculative-draft-model-path", str(MHA_DRAFTER))
    srv = Server(TARGET_DIR, tmp_path_factory.mktemp("dflash-mha") / "server.log",
                 COMMON_ARGS + spec + ("--disable-radix-cache",), env={"SGLANG_DFLASH_OPS": "triton"})
    try:
        out = {"greedy": generate_all(srv, PROMPTS[:len(DEMO_PROMPTS)], 24), "after": flushed_state(srv)}
        out["log"] = srv.log.read_text(errors="replace")
    finally:
        srv.stop()
    return out


def test_mha_drafter_with_triton_kernels_is_served_exactly(mha_triton, plain):
    from sglang_dflash.backend import get_ops
    from sglang_dflash.reference.offline import teacher_forced_commit_lens
    from sglang_dflash.reference.tiny_pair import load_tiny_pair

    assert "ops triton" in mha_triton["log"], "the worker did not run the Triton kernels"
    prompts = PROMPTS[:len(DEMO_PROMPTS)]
    answers = [o["output_ids"] for o in mha_triton["greedy"]]
    assert answers == [b["output_ids"][:24] for b in plain["greedy"][:len(prompts)]]
    target, drafter = load_tiny_pair(drafter_dir=MHA_DRAFTER)
    walks = teacher_forced_commit_lens(target, drafter, get_ops("torch"), prompts, answers, BLOCK)
    for ids, o, lens in zip(prompts, mha_triton["greedy"], walks):
        assert (o["meta_info"]["spec_verify_ct"], o["meta_info"]["completion_tokens"]) == \
            (len(lens), sum(lens) + 1), f"prompt {ids}: walk {lens}"
    assert mha_triton["after"][0] == 0 and not log_problems(mha_triton["log"])


def test_no_slot_leaked_and_no_traceback(served, plain):
    name, ours = served
    for label, server in (("plain", plain), (name, ours)):
        used, pool = server["after"]
        assert used == 0, f"{label}: {used} KV slots held after a flush"
        # every mamba slot free again: as many as before the first request, all of them
        assert server["before"][1] == pool and pool["available"] == pool["size"], f"{label}: {pool}"
        assert not log_problems(server["log"]), f"{label}: {log_problems(server['log'])}"
    assert ours["alive"], f"{name}: the server died"
