"""`sglang serve --speculative-algorithm dflash` on CPU, end to end through the plugin.

Two real SGLang 0.5.23 servers on the bundled tiny Qwen3 pair (fp32, torch-native
attention with the dev verify shim, started by ``python -m sglang_dflash.dev.cpu_shims serve``):
the session's plain one (``plain_servers``) and one with ``--speculative-algorithm dflash``
and the plugin's worker. Every
greedy answer of the DFlash server must equal the plain server's, token for token;
its per-request verify counts must equal the teacher-forced walk of the same pair;
after everything (concurrent batches, EOS and stop strings inside blocks, max_tokens
mid-block, a client that hangs up mid-stream, a prompt longer than the drafter's
positions, sampled requests beside greedy ones) the KV pool must hold no slot.

SGLang itself raises on a pool leak whenever the scheduler goes idle
(``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE``, on by default), which would take the
server down and fail every later test; the last test also reads the pool directly.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from plain_servers import QWEN3_COMMON_ARGS
from sglang_env import require_sglang

from sglang_dflash.dev.server import Server, ServerExited
from sglang_dflash.reference.tiny_pair import BOS, DEMO_PROMPTS, EOS, encode

require_sglang()
pytestmark = pytest.mark.slow

from sglang_dflash.reference.tiny_qwen3 import DRAFTER_DIR, TARGET_DIR  # noqa: E402

BLOCK = 16
# --sleep-on-idle: an idle scheduler sleeps instead of polling, so servers left idle by
# other tests do not starve the one under test on a 2-core machine
COMMON_ARGS = QWEN3_COMMON_ARGS
SPEC_ARGS = ("--speculative-algorithm", "dflash", "--speculative-draft-model-path", str(DRAFTER_DIR))
CONCURRENCY = 8
MAX_NEW = 40  # not a multiple of the block: the last step is cut by max_new_tokens


def corpus_prompts(n: int, seed: int = 7) -> list[list[int]]:
    """Prefixes (8..30 tokens, BOS first) of documents from the pair's training corpus."""
    from sglang_dflash.dev.train import synthetic_document

    rng = random.Random(seed)
    return [synthetic_document(rng)[: rng.randrange(8, 31)] for _ in range(n)]


PROMPTS = [encode(p) for p in DEMO_PROMPTS] + corpus_prompts(18)


def start(tmp_path_factory, name: str, extra: tuple[str, ...]) -> Server:
    root = tmp_path_factory.mktemp(name)
    srv = Server(TARGET_DIR, root / "server.log", COMMON_ARGS + extra)
    print(f"\n{name} server start-up: {srv.startup_s:.1f} s")
    return srv


@pytest.fixture(scope="module")
def plain(qwen3_plain):
    return qwen3_plain


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    srv = start(tmp_path_factory, "dflash", SPEC_ARGS)
    assert "DFlash worker: drafter" in srv.log.read_text(), "the plugin's worker did not start"
    yield srv
    srv.stop()


def generate_all(server: Server, prompts: list[list[int]], n: int, **params) -> list[dict]:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(lambda ids: server.generate(ids, n, **params)[0], prompts))


@pytest.fixture(scope="module")
def greedy_runs(plain, spec):
    """(plain, dflash) /generate answers to PROMPTS, sent CONCURRENCY at a time."""
    t0 = time.perf_counter()
    base = generate_all(plain, PROMPTS, MAX_NEW)
    t1 = time.perf_counter()
    ours = generate_all(spec, PROMPTS, MAX_NEW)
    t2 = time.perf_counter()
    tokens = sum(len(o["output_ids"]) for o in ours)
    print(f"\n{len(PROMPTS)} requests, {tokens} tokens: plain {t1 - t0:.1f} s, dflash {t2 - t1:.1f} s")
    return base, ours


def test_greedy_generate_equals_plain_server(greedy_runs):
    base, ours = greedy_runs
    for ids, b, o in zip(PROMPTS, base, ours):
        assert o["output_ids"] == b["output_ids"], f"prompt {ids}"
        assert o["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
    reasons = [o["meta_info"]["finish_reason"]["type"] for o in ours]
    # both endings must be exercised: EOS inside a block and max_new_tokens mid-block
    assert "stop" in reasons and "length" in reasons, reasons
    # an EOS the target reaches inside a block ends the request there
    eos_ended = [o for o in ours if o["meta_info"]["finish_reason"].get("matched") == EOS]
    assert eos_ended and all(o["output_ids"][-1] == EOS for o in eos_ended)


def test_accept_length_equals_teacher_forced_walk(greedy_runs):
    """The server's verify steps per request are exactly the offline walk's blocks."""
    from sglang_dflash.backend import get_ops
    from sglang_dflash.reference.offline import acceptance_stats, teacher_forced_commit_lens
    from sglang_dflash.reference.tiny_qwen3 import load_tiny_qwen3_pair

    _, ours = greedy_runs
    target, drafter = load_tiny_qwen3_pair()
    continuations = [o["output_ids"] for o in ours]
    walked = teacher_forced_commit_lens(target, drafter, get_ops("torch"), PROMPTS, continuations, BLOCK)
    for ids, o, lens in zip(PROMPTS, ours, walked):
        meta = o["meta_info"]
        # the server counts the token sampled by prefill too; the walk starts after it
        assert (meta["spec_verify_ct"], meta["completion_tokens"]) == (len(lens), sum(lens) + 1), \
            f"prompt {ids}: walk {lens}"
        assert meta["spec_accept_length"] == pytest.approx((sum(lens) + 1) / len(lens), abs=1e-9)
    offline = acceptance_stats([n for lens in walked for n in lens], BLOCK)
    served = sum(o["meta_info"]["completion_tokens"] for o in ours) / sum(
        o["meta_info"]["spec_verify_ct"] for o in ours)
    print(f"\noffline tau {offline.tau:.3f} over {offline.steps} steps; server accept length "
          f"{served:.3f} (prefill tokens included)")
    assert offline.tau >= 2.5, "the bundled pair's drafter should be well above chance"


def test_bench_online_tau_is_the_offline_quantity(spec):
    """`bench online` against the real DFlash server: its tau (first token excluded) equals
    the teacher-forced walk of the same greedy outputs, SGLang's figure counts the first
    token, and a level whose requests never reach a verify step shows no tau."""
    from sglang_dflash.backend import get_ops
    from sglang_dflash.bench import online
    from sglang_dflash.bench.client import Settings
    from sglang_dflash.bench.prompts import PromptItem
    from sglang_dflash.reference.offline import teacher_forced_commit_lens
    from sglang_dflash.reference.tiny_qwen3 import load_tiny_qwen3_pair

    items = [PromptItem(f"p{i}", "raw", text=t) for i, t in enumerate(DEMO_PROMPTS)]
    s = Settings(model="tiny", completions=True, max_tokens=MAX_NEW, temperature=0.0,
                 spec_details=True, timeout_s=300, api_key=None)
    info = spec.get("/server_info")
    level = online.run_level(spec.url(), items, 3, len(items), s, "test ", info)
    assert level["ok"] == len(items) and level["tau_requests"] == len(items)
    # the tiny Qwen3 tokenizer adds BOS, as encode() does
    outputs = [spec.generate(encode(t), MAX_NEW)[0] for t in DEMO_PROMPTS]
    target, drafter = load_tiny_qwen3_pair()
    walked = teacher_forced_commit_lens(target, drafter, get_ops("torch"), [encode(t) for t in DEMO_PROMPTS],
                                        [o["output_ids"] for o in outputs], BLOCK)
    steps, tokens = sum(map(len, walked)), sum(map(sum, walked))
    assert level["verify_steps"] == steps
    assert level["tau"] == pytest.approx(tokens / steps, abs=1e-12)
    assert level["sglang_accept_length"] == pytest.approx((tokens + len(items)) / steps, abs=1e-12)
    assert len(level["position_accept_rate"]) == BLOCK - 1

    # SGLang sends no acceptance stats for a request without a verify step
    one = online.run_level(spec.url(), items, 3, len(items), Settings(**{**s.__dict__, "max_tokens": 1}),
                           "test ", info)
    assert one["tau"] is None and one["no_verify_requests"] == len(items) and one["no_stats_requests"] == 0


def completion(server: Server, prompt, **body) -> dict:
    return server.post("/v1/completions", {"model": "tiny", "prompt": prompt, "temperature": 0, **body})[0]


def test_openai_completions_with_stop_strings(plain, spec):
    # stop strings that the target reaches in the middle of a verify block
    cases = [("count: 3 4 5 6", {"stop": [" 12"]}), ("12+7=19; 30+4=", {"stop": [";"]}),
             ("a red fox runs to the", {"stop": ["."]}), ("count: 41 42", {"max_tokens": 21})]
    for prompt, extra in cases:
        body = {"max_tokens": 48, **extra}
        b, o = completion(plain, [BOS] + list(prompt.encode()), **body), \
            completion(spec, [BOS] + list(prompt.encode()), **body)
        assert o["choices"][0]["text"] == b["choices"][0]["text"], (prompt, extra)
        assert o["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"]
        assert o["usage"]["completion_tokens"] == b["usage"]["completion_tokens"]
    assert completion(spec, [BOS] + list(b"count: 41 42"), max_tokens=21,
                      ignore_eos=True)["usage"]["completion_tokens"] == 21


def test_openai_chat_completions(plain, spec):
    for content in ("count: 5 6 7", "3+4=7; 10+10="):
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}],
                "max_tokens": 32, "temperature": 0}
        b, o = plain.post("/v1/chat/completions", body)[0], spec.post("/v1/chat/completions", body)[0]
        assert o["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
        assert o["usage"] == b["usage"]


def test_prompt_longer_than_drafter_positions(plain, spec):
    from sglang_dflash.config import load_drafter_config

    limit = load_drafter_config(DRAFTER_DIR).max_position_embeddings
    ids = [BOS] + list(("count: " + " ".join(str(i) for i in range(400)))[: limit + 150].encode())
    assert len(ids) > limit
    b, o = plain.generate(ids, 24)[0], spec.generate(ids, 24)[0]
    assert o["output_ids"] == b["output_ids"]


def test_sampled_and_greedy_requests_in_one_batch(plain, spec):
    prompts = PROMPTS[:8]
    greedy = generate_all(plain, prompts, 24)

    def one(i: int) -> dict:
        if i % 2:
            return spec.generate(prompts[i], 24, temperature=0.8, top_p=0.9, ignore_eos=True)[0]
        return spec.generate(prompts[i], 24)[0]

    with ThreadPoolExecutor(len(prompts)) as pool:
        mixed = list(pool.map(one, range(len(prompts))))
    for i, (g, m) in enumerate(zip(greedy, mixed)):
        if i % 2:
            assert len(m["output_ids"]) == 24 and all(0 <= t < 264 for t in m["output_ids"])
        else:
            assert m["output_ids"] == g["output_ids"], f"greedy request {i} beside sampled ones"


def test_client_hang_up_aborts_the_request(plain, spec):
    spec.hang_up_mid_stream(PROMPTS[0], chunks=3)
    spec.wait_idle()
    # the server keeps serving, and what follows is still exact
    b, o = plain.generate(PROMPTS[1], 24)[0], spec.generate(PROMPTS[1], 24)[0]
    assert o["output_ids"] == b["output_ids"]


def assert_no_slot_held(server: Server) -> None:
    """Once idle and with the radix cache flushed, the KV pool holds no slot."""
    server.wait_idle()
    assert server.post_text("/flush_cache", {})[0].startswith("Cache flushed")
    load = server.wait_idle()
    assert load["num_used_tokens"] == 0, load


def test_page_size_4_without_overlap(tmp_path_factory, greedy_runs):
    """Pages of 4 slots, and the scheduler's synchronous loop instead of the overlapped one."""
    base, _ = greedy_runs
    srv = start(tmp_path_factory, "dflash-page4", SPEC_ARGS + ("--page-size", "4",
                                                                "--disable-overlap-schedule"))
    try:
        ours = generate_all(srv, PROMPTS[:8], MAX_NEW)
        for ids, b, o in zip(PROMPTS, base, ours):
            assert o["output_ids"] == b["output_ids"], f"prompt {ids}"
        assert_no_slot_held(srv)
    finally:
        srv.stop()


def test_no_kv_slot_leaked(spec):
    """Last in the module: after all the above, flushing the radix cache frees every slot."""
    assert_no_slot_held(spec)
    assert spec.proc.poll() is None
    assert "memory leak detected" not in spec.log.read_text()


def bad_drafter(tmp_path: Path, **changes) -> Path:
    out = tmp_path / "bad-drafter"
    shutil.copytree(DRAFTER_DIR, out)
    config = json.loads((out / "config.json").read_text())
    for key, value in changes.items():
        target = config["dflash_config"] if key in config.get("dflash_config", {}) else config
        target[key] = value
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_bad_drafter_config_stops_start_up(tmp_path):
    drafter = bad_drafter(tmp_path, hidden_size=96, mask_token_id=4000, target_layer_ids=[1, 9])
    args = ("--speculative-algorithm", "dflash", "--speculative-draft-model-path", str(drafter))
    with pytest.raises(ServerExited) as failed:
        Server(TARGET_DIR, tmp_path / "server.log", COMMON_ARGS + args)
    log = (tmp_path / "server.log").read_text(errors="replace")
    for needle in ("hidden_size", "mask_token_id", "target_layer_ids", str(drafter)):
        assert needle in log, f"start-up error does not name {needle!r}:\n{failed.value}"
