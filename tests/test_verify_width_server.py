"""Verify width W through a real `sglang serve` on CPU (bundled tiny Qwen3 pair, block 16).

The session's plain server (``plain_servers``) answers the prompts first, then one DFlash
server per W (``--speculative-num-draft-tokens W``): W = 4 with the overlap scheduler, W = 8
without it. Each must give the plain server's greedy tokens, take exactly the
teacher-forced walk's steps for "draft 16, verify W", report W in ``/server_info`` with
its acceptance counts (``dflash_acceptance``), and answer sampled requests beside
greedy ones with the greedy ones still exact.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from plain_servers import QWEN3_COMMON_ARGS
from sglang_env import require_sglang

from sglang_dflash.dev.server import Server
from sglang_dflash.reference.tiny_pair import DEMO_PROMPTS, encode

require_sglang()
pytestmark = pytest.mark.slow

from sglang_dflash.reference.tiny_qwen3 import DRAFTER_DIR, TARGET_DIR  # noqa: E402

BLOCK = 16
COMMON_ARGS = QWEN3_COMMON_ARGS
MAX_NEW = 40
WIDTHS = {4: (), 8: ("--disable-overlap-schedule",)}


def corpus_prompts(n: int, seed: int = 11) -> list[list[int]]:
    from sglang_dflash.dev.train import synthetic_document

    rng = random.Random(seed)
    return [synthetic_document(rng)[: rng.randrange(8, 31)] for _ in range(n)]


PROMPTS = [encode(p) for p in DEMO_PROMPTS] + corpus_prompts(10)


def generate_all(server: Server, prompts, n: int, **params) -> list[dict]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda ids: server.generate(ids, n, **params)[0], prompts))


def serve(tmp_path_factory, name: str, extra: tuple[str, ...], work):
    srv = Server(TARGET_DIR, tmp_path_factory.mktemp(name) / "server.log", COMMON_ARGS + extra)
    t0 = time.perf_counter()
    try:
        return work(srv), srv.log.read_text(errors="replace")
    finally:
        print(f"\n{name}: start-up {srv.startup_s:.1f} s, requests {time.perf_counter() - t0:.1f} s")
        srv.stop()


@pytest.fixture(scope="module")
def plain(qwen3_plain):
    return generate_all(qwen3_plain, PROMPTS, MAX_NEW)


@pytest.fixture(scope="module", params=sorted(WIDTHS), ids=lambda w: f"W{w}")
def served(request, tmp_path_factory):
    W = request.param

    def work(srv: Server) -> dict:
        before = srv.get("/server_info")
        greedy = generate_all(srv, PROMPTS, MAX_NEW)
        after = srv.get("/server_info")
        # sampled requests (odd rows) beside greedy ones (even rows), all in flight together
        with ThreadPoolExecutor(8) as pool:
            mixed = list(pool.map(
                lambda i: srv.generate(PROMPTS[i], 24, **({"temperature": 0.8, "top_p": 0.9, "ignore_eos": True}
                                                          if i % 2 else {}))[0], range(8)))
        return {"W": W, "before": before, "greedy": greedy, "after": after, "mixed": mixed}

    extra = ("--speculative-algorithm", "dflash", "--speculative-draft-model-path", str(DRAFTER_DIR),
             "--speculative-num-draft-tokens", str(W), *WIDTHS[W])
    result, log = serve(tmp_path_factory, f"dflash-W{W}", extra, work)
    assert f"block {BLOCK}, verify width {W}" in log, "the worker did not start with the verify width"
    return result


def test_greedy_output_equals_plain_at_every_width(plain, served):
    for ids, b, o in zip(PROMPTS, plain, served["greedy"]):
        assert o["output_ids"] == b["output_ids"], f"W={served['W']} prompt {ids}"
        assert o["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]


def test_steps_are_the_teacher_forced_walk_of_draft_16_verify_w(served):
    from sglang_dflash.backend import get_ops
    from sglang_dflash.reference.offline import teacher_forced_commit_lens
    from sglang_dflash.reference.tiny_qwen3 import load_tiny_qwen3_pair

    W, greedy = served["W"], served["greedy"]
    target, drafter = load_tiny_qwen3_pair()
    walked = teacher_forced_commit_lens(target, drafter, get_ops("torch"), PROMPTS,
                                        [o["output_ids"] for o in greedy], BLOCK, W)
    for ids, o, lens in zip(PROMPTS, greedy, walked):
        meta = o["meta_info"]
        assert (meta["spec_verify_ct"], meta["completion_tokens"]) == (len(lens), sum(lens) + 1), ids
        # SGLang prices proposals by its speculative_num_draft_tokens: W - 1 per step
        assert meta["spec_num_proposed_drafts"] == len(lens) * (W - 1)
        assert len(meta.get("spec_correct_drafts_histogram", [])) <= W
    assert max(n for lens in walked for n in lens) == W, "no step used the whole verify width"


def test_server_info_reports_the_width_and_its_counts(served):
    W, greedy = served["W"], served["greedy"]
    before, after = (served[k]["internal_states"][0] for k in ("before", "after"))
    assert served["after"]["speculative_num_draft_tokens"] == W
    counts = after["dflash_acceptance"]
    assert (counts["block_size"], counts["verify_width"]) == (BLOCK, W)
    assert len(counts["position_accept_rate"]) == W - 1
    delta = [a - b for a, b in zip(counts["accepted_drafts_histogram"],
                                   before["dflash_acceptance"]["accepted_drafts_histogram"])]
    per_request = [0] * W
    for o in greedy:
        for i, n in enumerate(o["meta_info"].get("spec_correct_drafts_histogram", [])):
            per_request[i] += n
    if WIDTHS[W]:  # without overlap every verified row belongs to a live request
        assert delta == per_request
    else:  # with overlap a finished request may be verified once more, then discarded
        assert all(d >= p for d, p in zip(delta, per_request))
        assert sum(per_request) <= sum(delta) <= sum(per_request) + len(greedy)
    print(f"\nW={W}: server counts {delta}, per-request {per_request}")


def test_sampled_beside_greedy_keeps_greedy_exact(plain, served):
    for i, (m, b) in enumerate(zip(served["mixed"], plain)):
        if i % 2:
            assert len(m["output_ids"]) == 24 and all(0 <= t < 264 for t in m["output_ids"])
        else:
            assert m["output_ids"] == b["output_ids"][:24], f"greedy request {i} beside sampled ones"
