"""Soak: a seeded mixed load of ~350 requests through a plain and a DFlash CPU server.

The tiny Qwen3 pair, the DFlash server verifying W = 6 of the drafter's 16-block, one
server after the other, the same requests in the same order,
``soak_load.CONCURRENCY`` at a time (the kinds: ``soak_load.KINDS``). Oracle:

- every greedy request's answer (token ids or text, finish reason, logprobs) equals the
  plain server's; ``n > 1`` greedy samples all of them;
- every sampled answer is valid: token ids in the vocabulary, no more than asked, a
  ``length`` finish at exactly ``max_new_tokens``, a ``stop`` finish on EOS;
- every malformed request gets the same 4xx class from both servers;
- a hang-up or an ``/abort_request`` ends its request and nothing else;
- both servers answer every request (no connection lost) and are alive at the end; after
  a flush no KV slot is held; no traceback and no leak report in either log (SGLang's idle
  check covers the request slots and, on hybrid targets, the state slots).

The plain server is the session's (``plain_servers``), which runs with
``--disable-overlap-schedule``: with overlap on, SGLang's plain
server feeds its penalizers the output one token late (``ScheduleBatch.
cumulate_penalty_output_tokens`` reads ``req.output_ids`` before the last step is
processed), so its penalised answers are not the definition that the DFlash worker
follows exactly (see ``sglang_dflash.worker.logits``). Everything else is the same either way.

The figures (requests by kind, mismatches, statuses by class, latency p50/p99 per
server) are printed before anything is asserted.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict

import pytest
from soak_load import GREEDY_KINDS, KINDS, Case, Outcome, run_cases, soak_cases
from plain_servers import QWEN3_COMMON_ARGS
from sglang_env import require_sglang

from sglang_dflash.dev.server import Server

require_sglang()
pytestmark = pytest.mark.slow

from sglang_dflash.reference.tiny_pair import EOS, VOCAB_SIZE  # noqa: E402
from sglang_dflash.reference.tiny_qwen3 import DRAFTER_DIR, TARGET_DIR  # noqa: E402

# verify width 6 of the 16-block, as the shipped low-concurrency H200 config: every request
# kind through W < L (test_exactness_server and test_dflash_server run W = 16)
SPEC_ARGS = ("--speculative-algorithm", "dflash", "--speculative-draft-model-path", str(DRAFTER_DIR),
             "--speculative-num-draft-tokens", "6")
LOGPROB_TOL = 1e-4


def status_class(status: int) -> str:
    return "lost" if status < 0 else f"{status // 100}xx"


def same(a, b) -> bool:
    """Equal, floats (logprobs) within LOGPROB_TOL."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(
            a, b, rel_tol=0, abs_tol=LOGPROB_TOL)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def valid_sample(case: Case, answer: list) -> bool:
    if not isinstance(answer, list):
        return False
    for sample in answer:
        ids, finish = sample["ids"], sample["finish"]
        if not all(0 <= t < VOCAB_SIZE for t in ids) or len(ids) > case.max_new:
            return False
        if finish["type"] == "length" and len(ids) != case.max_new:
            return False
        if finish["type"] == "stop" and not (ids and ids[-1] == EOS == finish.get("matched")):
            return False
    return True


def mismatch(case: Case, plain: Outcome, ours: Outcome) -> str | None:
    """Why the DFlash server's outcome fails the oracle, or None."""
    if case.kind == "malformed":
        if status_class(plain.status) != "4xx" or status_class(ours.status) != status_class(plain.status):
            return f"status {plain.status} (plain) vs {ours.status}: {ours.error or plain.error}"
        return None
    if ours.status != 200 or plain.status != 200:
        return f"status {plain.status} (plain) vs {ours.status}: {ours.error or plain.error}"
    if case.kind in GREEDY_KINDS and not same(plain.answer, ours.answer):
        return f"answer differs:\n  plain {str(plain.answer)[:400]}\n  ours  {str(ours.answer)[:400]}"
    if case.kind == "n_greedy" and any(s != ours.answer[0] for s in ours.answer):
        return "greedy samples of one request differ"
    if case.kind == "sampled" and not valid_sample(case, ours.answer):
        return f"invalid sample {str(ours.answer)[:400]}"
    if case.kind == "hang_up" and not ours.answer:
        return "no event before the hang-up"
    if case.kind == "abort" and not all(s["finish"]["type"] in ("abort", "length") for s in ours.answer):
        return f"aborted request ended {ours.answer[0]['finish']}"
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def figures(cases, plain, ours, misses) -> str:
    lines = [f"{'kind':>12} {'requests':>8} {'mismatch':>8}  statuses plain | dflash"]
    by_kind = defaultdict(list)
    for i, case in enumerate(cases):
        by_kind[case.kind].append(i)
    for kind in KINDS:
        rows = by_kind.get(kind, [])
        classes = [Counter(status_class(o[i].status) for i in rows) for o in (plain, ours)]
        lines.append(f"{kind:>12} {len(rows):>8} {sum(i in misses for i in rows):>8}  "
                     f"{dict(classes[0])} | {dict(classes[1])}")
    for name, outcomes in (("plain", plain), ("dflash", ours)):
        seconds = [o.seconds for o, c in zip(outcomes, cases) if c.kind not in ("hang_up", "malformed")]
        lines.append(f"{name} latency p50 {percentile(seconds, 0.5):.2f} s, p99 {percentile(seconds, 0.99):.2f} s")
    lines.append(f"total {len(cases)} requests per server, {len(misses)} mismatches")
    return "\n".join(lines)


def wait_idle(server: Server, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        load = server.get("/v1/loads")["loads"][0]
        if (load["num_running_reqs"], load["num_waiting_reqs"]) == (0, 0) or time.monotonic() > deadline:
            return load
        time.sleep(0.5)


def soak(server: Server, cases: list[Case]) -> tuple[list[Outcome], dict]:
    """Outcomes of ``cases`` and the server's load after a flush."""
    t0 = time.perf_counter()
    outcomes = run_cases(server.port, cases)
    print(f"\n{len(cases)} requests in {time.perf_counter() - t0:.1f} s (start-up {server.startup_s:.1f} s)")
    try:
        wait_idle(server)
        flushed = server.post_text("/flush_cache", {})[0]
        return outcomes, {**wait_idle(server), "alive": server.healthy(), "flushed": flushed}
    except (OSError, AssertionError):  # the server is gone (ServerExited is an AssertionError)
        return outcomes, {"alive": False}


def soaked(srv: Server, cases: list[Case]):
    """(outcomes, the server's state after them, its log)."""
    outcomes, after = soak(srv, cases)
    return outcomes, {**after, "tracebacks": srv.tracebacks()}, srv.log.read_text(errors="replace")


def test_soak_plain_vs_dflash(tmp_path_factory, qwen3_plain):
    cases = soak_cases()
    assert len(cases) >= 300 and {c.kind for c in cases} == set(KINDS)
    plain, plain_after, plain_log = soaked(qwen3_plain, cases)
    srv = Server(TARGET_DIR, tmp_path_factory.mktemp("soak-dflash") / "server.log", QWEN3_COMMON_ARGS + SPEC_ARGS)
    try:
        ours, ours_after, ours_log = soaked(srv, cases)
    finally:
        srv.stop()
    assert "DFlash worker: drafter" in ours_log, "the plugin's worker did not start"

    misses = {i: why for i, (c, p, o) in enumerate(zip(cases, plain, ours)) if (why := mismatch(c, p, o))}
    print(figures(cases, plain, ours, misses))
    for i, why in list(misses.items())[:12]:
        print(f"case {i} ({cases[i].kind}, {cases[i].path} {str(cases[i].body)[:200]}): {why}")

    for name, after, log in (("plain", plain_after, plain_log), ("dflash", ours_after, ours_log)):
        assert after["alive"], f"{name} server died during the soak:\n{log[-3000:]}"
        assert after["flushed"].startswith("Cache flushed") and after["num_used_tokens"] == 0, (name, after)
        assert "memory leak detected" not in log, f"{name} log: {log[-3000:]}"
        assert not after["tracebacks"], f"{name} log: {after['tracebacks'][0][:3000]}"
    assert not [o for o in plain if o.status < 0], "the plain server lost requests"
    assert not misses, f"{len(misses)} of {len(cases)} requests fail the oracle (figures above)"
