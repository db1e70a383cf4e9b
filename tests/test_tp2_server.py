"""`--tp-size 2` on CPU: the tiny Qwen3 pair served with DFlash over two gloo ranks.

The only place the vocab-parallel draft path runs before a multi-GPU machine: each rank's
lm_head shard proposes its best token per block position, and the worker gathers the
(logit, id) pairs from both ranks and keeps the best. SGLang shards the 264-row vocabulary
as rows 0-159 on rank 0 and 160-263 on rank 1, so EOS (257) is only ever drafted through
the gather. Checked: greedy output equal to a tp 1 plain server on every prompt; each
request's verify steps and accepted drafts equal the teacher-forced walk of the pair; the
walk proves that some accepted drafts were rank 1's tokens, and a walk that drafts from
rank 0's shard alone accepts less; no KV slot held after a flush.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from sglang_env import require_sglang

from sglang_dflash.dev.server import Server, cpu_tp_env
from sglang_dflash.reference.tiny_pair import EOS

require_sglang()
pytestmark = pytest.mark.slow

from test_dflash_server import BLOCK, COMMON_ARGS, PROMPTS, SPEC_ARGS, assert_no_slot_held  # noqa: E402

RANK1_FIRST_ID = 160  # SGLang's vocab shard boundary for 264 rows at tp 2 (padded to 320)
# 24 prompts to their end (EOS inside a block) or 40 tokens, then 8 that run through EOS
REQUESTS = [(ids, 40, False) for ids in PROMPTS] + [(ids, 64, True) for ids in PROMPTS[:8]]


def generate_all(server: Server) -> list[dict]:
    def one(req):
        ids, n, ignore_eos = req
        return server.generate(ids, n, ignore_eos=ignore_eos)[0]

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, REQUESTS))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, qwen3_plain):
    """(tp 1 plain answers, tp 2 DFlash answers, the tp 2 server, still running)."""
    from sglang_dflash.reference.tiny_qwen3 import TARGET_DIR

    root = tmp_path_factory.mktemp("tp2")
    base = generate_all(qwen3_plain)  # the session's tp 1 plain server (plain_servers)
    spec = Server(TARGET_DIR, root / "dflash-tp2.log", COMMON_ARGS + SPEC_ARGS + ("--tp-size", "2"),
                  env=cpu_tp_env(2))
    try:
        log = spec.log.read_text()
        assert "DFlash worker: drafter" in log and "tp 2" in log, "the plugin's tp 2 worker did not start"
        t0 = time.perf_counter()
        ours = generate_all(spec)
        print(f"\ntp 2 DFlash server: start-up {spec.startup_s:.1f} s, {len(REQUESTS)} requests "
              f"in {time.perf_counter() - t0:.1f} s")
        yield base, ours, spec
    finally:
        spec.stop()


def test_greedy_equals_tp1_plain_server(runs):
    base, ours, _ = runs
    for (ids, n, ignore_eos), b, o in zip(REQUESTS, base, ours):
        assert o["output_ids"] == b["output_ids"], f"prompt {ids} (max {n}, ignore_eos {ignore_eos})"
        assert o["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
    assert any(o["meta_info"]["finish_reason"].get("matched") == EOS for o in ours)


def walk(target, drafter, ops, prompts: list[list[int]], outputs: list[list[int]]) -> list[list[tuple]]:
    """Per request, (drafts, accepted drafts) of every block the teacher-forced walk visits.

    The last block's accept count stops at the output's end; the server keeps comparing
    drafts past it, so there it may count more.
    """
    from sglang_dflash.reference.offline import teacher_forced_commit_lens

    calls: list[list[int]] = []

    def recording_head(hidden, weight, vocab_start):
        best, ids = ops.greedy_head(hidden, weight, vocab_start)
        calls.append(ids.tolist())
        return best, ids

    lens = teacher_forced_commit_lens(target, drafter, replace(ops, greedy_head=recording_head),
                                      prompts, outputs, BLOCK)
    # walk step k drafts one block for each request with more than k blocks, in request
    # order: e.g. blocks per request [2, 1, 2] -> step 0 rows (0, 1, 2), step 1 rows (0, 2)
    drafts: list[list[list[int]]] = [[] for _ in prompts]
    for k, ids in enumerate(calls):
        rows = [i for i, n in enumerate(lens) if len(n) > k]
        for r, i in enumerate(rows):
            drafts[i].append(ids[r * (BLOCK - 1):(r + 1) * (BLOCK - 1)])
    blocks = []
    for prompt, out, request_drafts, request_lens in zip(prompts, outputs, drafts, lens, strict=True):
        seq, start, per_block = prompt + out, len(prompt), []
        for block_drafts, commit in zip(request_drafts, request_lens, strict=True):
            left = len(seq) - 1 - start
            accept = 0
            while accept < min(BLOCK - 1, left) and block_drafts[accept] == seq[start + 1 + accept]:
                accept += 1
            per_block.append((block_drafts, accept))
            start += commit
        blocks.append(per_block)
    return blocks


def rank0_only(ops):
    """The drafts a broken gather would give: rank 0's shard of the lm_head alone."""
    return replace(ops, greedy_head=lambda h, w, s: ops.greedy_head(h, w[:RANK1_FIRST_ID], s))


def test_verify_steps_and_drafts_equal_the_walk(runs):
    from sglang_dflash.backend import get_ops
    from sglang_dflash.reference.tiny_qwen3 import load_tiny_qwen3_pair

    _, ours, _ = runs
    target, drafter = load_tiny_qwen3_pair()
    ops = get_ops("torch")
    prompts, outputs = [ids for ids, _, _ in REQUESTS], [o["output_ids"] for o in ours]
    walked, broken = walk(target, drafter, ops, prompts, outputs), walk(target, drafter, rank0_only(ops),
                                                                       prompts, outputs)
    for ids, o, blocks in zip(prompts, ours, walked):
        meta = o["meta_info"]
        assert (meta["spec_verify_ct"], meta["completion_tokens"]) == (len(blocks), len(o["output_ids"])), \
            f"prompt {ids}"
        # the server's accept count of every block but the last is the walk's, and the
        # last is at least the walk's (which stops at the output's end)
        served = Counter({k: v for k, v in enumerate(meta["spec_correct_drafts_histogram"]) if v})
        extra = served - Counter(a for _, a in blocks[:-1])
        assert served.total() == len(blocks) and extra.total() == 1 and max(extra) >= blocks[-1][1], \
            f"prompt {ids}: server {dict(served)}, walk {[a for _, a in blocks]}"
    rank1_drafts = sum(t >= RANK1_FIRST_ID for blocks in walked for d, a in blocks for t in d[:a])
    rank0_differs = sum([a for _, a in w] != [a for _, a in b] for w, b in zip(walked, broken))
    print(f"\naccepted drafts from rank 1's vocab shard: {rank1_drafts}; requests a rank-0-only "
          f"draft would serve differently: {rank0_differs} of {len(REQUESTS)}")
    assert rank1_drafts > 0 and rank0_differs > 0


def test_no_kv_slot_leaked(runs):
    _, _, spec = runs
    assert_no_slot_held(spec)
    assert spec.proc.poll() is None
    assert "memory leak detected" not in spec.log.read_text(errors="replace")
    assert not spec.tracebacks(), spec.tracebacks()[0]
