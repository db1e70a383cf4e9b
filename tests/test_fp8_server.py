"""DFlash CPU servers with an fp8 (e4m3) draft K/V pool (``--speculative-draft-kv-cache-dtype
fp8_e4m3``) against the plain servers, on both bundled tiny pairs.

Per pair one fp8 DFlash server, compared with the session's plain server of its target
(``plain_servers``). What must hold:

- greedy output of the fp8 server equals the plain server's token for token (losslessness
  does not depend on what the drafter proposes);
- the worker's pool is e4m3 at exactly the bytes per token SGLang's planner charged;
- each request's verify count and tokens equal the teacher-forced walk of the pair with an
  fp8 pool over the plain continuation, so the tau the server reports is the offline fp8
  figure; the prompt set is one on which the fp8 and fp32 walks differ, so a server that
  drafted from a float pool would fail this. (Servers with the default pool are checked
  against the fp32 walk by ``test_dflash_server`` and ``test_kimi_server``.)

The taus, teacher-forced with both pools and through the fp8 server, are printed
(``pytest -s``).
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from plain_servers import KIMI_COMMON_ARGS, QWEN3_COMMON_ARGS
from sglang_env import require_sglang

from sglang_dflash.dev.server import Server
from sglang_dflash.reference import tiny_pair, tiny_qwen3
from sglang_dflash.reference.tiny_pair import DEMO_PROMPTS, encode

require_sglang()
pytestmark = pytest.mark.slow

BLOCK = 16
MAX_NEW = 40
FP8 = ("--speculative-draft-kv-cache-dtype", "fp8_e4m3")
FP8_POOL_LOG = re.compile(r"DFlash draft K/V: (\S+), (\d+) B/token x \d+ slots = [\d.]+ MiB; "
                          r"SGLang's planner charged (\d+) B/token")


@dataclass(frozen=True)
class Pair:
    target: Path
    drafter: Path
    args: tuple[str, ...]    # the flags of the pair's plain server, which the DFlash one shares
    plain: str  # the session fixture of that plain server

    def spec(self) -> tuple[str, ...]:
        return ("--speculative-algorithm", "dflash", "--speculative-draft-model-path", str(self.drafter))


PAIRS = {
    "qwen3": Pair(tiny_qwen3.TARGET_DIR, tiny_qwen3.DRAFTER_DIR, QWEN3_COMMON_ARGS, "qwen3_plain"),
    # SGLang's Kimi-Linear on CPU: radix caching of linear state needs no_buffer (see test_kimi_server)
    "kimi": Pair(tiny_pair.TARGET_DIR, tiny_pair.DRAFTER_DIR, KIMI_COMMON_ARGS + ("--disable-radix-cache",),
                 "kimi_plain"),
}


def _prompts() -> list[list[int]]:
    from test_dflash_server import corpus_prompts

    return [encode(p) for p in DEMO_PROMPTS] + corpus_prompts(6)


PROMPTS = _prompts()


def _answer(srv: Server, name: str) -> dict:
    """PROMPTS answered greedily, 4 at a time, and the server's log."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda ids: srv.generate(ids, MAX_NEW)[0], PROMPTS))
    print(f"\n{name}: start-up {srv.startup_s:.1f} s, {len(PROMPTS)} requests {time.perf_counter() - t0:.1f} s")
    assert not srv.tracebacks(), srv.tracebacks()[0]
    return {"answers": answers, "log": srv.log.read_text(errors="replace")}


def _load(pair_name: str):
    if pair_name == "qwen3":
        return tiny_qwen3.load_tiny_qwen3_pair()
    return tiny_pair.load_tiny_pair()


def _walks(pair_name: str, continuations: list[list[int]]) -> dict[str, list[list[int]]]:
    """The teacher-forced commit lengths per prompt with the default and the fp8 pool."""
    from sglang_dflash.backend import get_ops
    from sglang_dflash.reference.offline import teacher_forced_commit_lens

    target, drafter = _load(pair_name)
    walks = {}
    for name, dtype in (("default", None), ("fp8", torch.float8_e4m3fn)):
        drafter.kv_dtype = dtype
        walks[name] = teacher_forced_commit_lens(target, drafter, get_ops("torch"), PROMPTS, continuations, BLOCK)
    return walks


@pytest.fixture(scope="module", params=list(PAIRS))
def served(request, tmp_path_factory):
    """(pair name, {server name: what it answered}, the walks over the plain answers)."""
    name, pair = request.param, PAIRS[request.param]
    runs = {"plain": _answer(request.getfixturevalue(pair.plain), f"{name} plain")}
    srv = Server(pair.target, tmp_path_factory.mktemp(f"fp8-{name}") / "server.log", pair.args + pair.spec() + FP8)
    try:
        runs["fp8"] = _answer(srv, f"{name} dflash-fp8")
    finally:
        srv.stop()
    walks = _walks(name, [a["output_ids"] for a in runs["plain"]["answers"]])
    return name, runs, walks


def test_fp8_draft_greedy_output_equals_plain_server(served):
    name, runs, _ = served
    for ids, b, o in zip(PROMPTS, runs["plain"]["answers"], runs["fp8"]["answers"]):
        assert o["output_ids"] == b["output_ids"], f"{name}: prompt {ids}"
        assert o["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
    reasons = {o["meta_info"]["finish_reason"]["type"] for o in runs["fp8"]["answers"]}
    assert reasons == {"stop", "length"}, f"{name}: both EOS and max_new_tokens must end blocks: {reasons}"


def test_the_pool_is_fp8_at_the_planned_bytes(served):
    name, runs, _ = served
    found = FP8_POOL_LOG.search(runs["fp8"]["log"])
    assert found, runs["fp8"]["log"][-3000:]
    dtype, held, planned = found.group(1), int(found.group(2)), int(found.group(3))
    # both tiny drafters: 2 layers x (K, V) x 2 KV heads x head dim 16 x 1 B
    assert (dtype, held, planned) == ("torch.float8_e4m3fn", 2 * 2 * 2 * 16, 2 * 2 * 2 * 16), name


def _served_tau(answers: list[dict]) -> float:
    """SGLang's accept length over the set (prefill token included)."""
    return sum(a["meta_info"]["completion_tokens"] for a in answers) / sum(
        a["meta_info"]["spec_verify_ct"] for a in answers)


def _assert_counts_are_the_walk(name: str, answers: list[dict], walk: list[list[int]]) -> None:
    for ids, a, lens in zip(PROMPTS, answers, walk):
        meta = a["meta_info"]
        # the server counts the token sampled by prefill too; the walk starts after it
        assert (meta["spec_verify_ct"], meta["completion_tokens"]) == (len(lens), sum(lens) + 1), \
            f"{name}: prompt {ids}: walk {lens}"


def test_verify_counts_equal_the_fp8_teacher_forced_walk(served):
    from sglang_dflash.acceptance import acceptance_stats

    name, runs, walks = served
    tau = {k: acceptance_stats([n for lens in w for n in lens], BLOCK).tau for k, w in walks.items()}
    print(f"\n{name}: teacher-forced tau, default pool {tau['default']:.3f}, fp8 pool {tau['fp8']:.3f}; "
          f"fp8 server accept length (prefill token included) {_served_tau(runs['fp8']['answers']):.3f}")
    assert walks["fp8"] != walks["default"], f"{name}: the prompts do not tell fp8 from float drafting"
    _assert_counts_are_the_walk(f"{name} fp8", runs["fp8"]["answers"], walks["fp8"])
    assert tau["fp8"] >= 2.5, f"{name}: the fp8 pool should keep the bundled drafter well above chance"
