"""`sglang-dflash demo`: the bundled tiny pair served by real SGLang servers on CPU.

Two `sglang serve` processes on the bundled tiny Qwen3 pair, one plain and one with
`--speculative-algorithm dflash` (this package's worker, loaded by SGLang's plugin entry
point), both through the development CPU shims (`sglang_dflash.dev.cpu_shims`: SGLang
has no CPU path without its CUDA kernel package). The demo prompts go to both through
the OpenAI-compatible `/v1/completions` endpoint, greedy, and the report gives tau and
the per-position acceptance as the DFlash server reports them, both servers' tokens per
second, and whether every answer equals the plain server's (exit status 1 if not).
`--reference` runs the pure-torch reference loop on the Kimi-shaped pair instead.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .acceptance import from_accepted_histogram
from .bench.client import RequestResult, Settings, run_request
from .bench.prompts import PromptItem

CPU_NOTE = ("CPU, tiny model: the servers' per-step overhead dominates, so these speeds say "
            "nothing about a GPU")


def _bar(fraction: float, width: int = 30) -> str:
    return "#" * round(fraction * width)


def _start_servers(logs: Path):
    from .dev.server import Server
    from .reference.tiny_qwen3 import DRAFTER_DIR, TARGET_DIR

    common = ("--max-total-tokens", "8192", "--max-running-requests", "16", "--sleep-on-idle")
    spec = ("--speculative-algorithm", "dflash", "--speculative-draft-model-path", str(DRAFTER_DIR))
    servers = {"plain": Server(TARGET_DIR, logs / "plain.log", common, wait=False),
               "dflash": Server(TARGET_DIR, logs / "dflash.log", common + spec, wait=False)}
    t0 = time.monotonic()
    waiting = dict(servers)
    try:
        while waiting:
            for name in [n for n, s in waiting.items() if s.healthy()]:
                print(f"  {name} server up on port {servers[name].port} after "
                      f"{servers[name].startup_s:.0f} s", flush=True)
                del waiting[name]
            if waiting and time.monotonic() - t0 > 400:
                raise RuntimeError(f"servers not healthy after 400 s: {sorted(waiting)} "
                                   f"(logs in {logs})")
            time.sleep(1.0)
    except BaseException:
        for s in servers.values():
            s.stop()
        raise
    return servers


def _send_all(url: str, items: list[PromptItem], s: Settings) -> tuple[list[RequestResult], float]:
    """Every prompt at once; (results, seconds for the whole set)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(items)) as pool:
        results = list(pool.map(lambda item: run_request(url, item, s), items))
    return results, time.perf_counter() - t0


def _report(prompts, plain, spec, plain_s: float, spec_s: float, block_size: int) -> bool:
    equal = [p.ok and d.ok and p.text == d.text and p.completion_tokens == d.completion_tokens
             for p, d in zip(plain, spec)]
    for text, d, same in zip(prompts, spec, equal):
        steps = d.spec_verify_ct or 0
        tau = f"tau {(d.completion_tokens - 1) / steps:.2f}" if steps else "no verify step"
        print(f"  {text!r:28} -> {d.text!r}  [{'==' if same else '!='} plain, {tau}]")
    for d in spec:
        if not d.ok:
            print(f"  request failed: {d.error}")
    stepped = [d for d in spec if d.ok and d.spec_verify_ct]
    steps = sum(d.spec_verify_ct for d in stepped)
    if steps:
        tau = sum(d.completion_tokens - 1 for d in stepped) / steps
        sglang = sum(d.completion_tokens for d in stepped) / steps
        print(f"\ntau (tokens per verify step, each request's first token excluded): {tau:.3f} "
              f"over {steps} steps; SGLang's accept length (first token counted): {sglang:.3f}")
        histogram = [0] * block_size
        for d in stepped:
            for accepted, count in enumerate(d.spec_correct_drafts_histogram or []):
                histogram[accepted] += count
        stats = from_accepted_histogram(histogram, block_size)
        print("\nP(draft position j accepted), from the DFlash server's per-request histograms:")
        for j, rate in enumerate(stats.position_accept_rate, start=1):
            print(f"  {j:>2} {rate:6.3f} {_bar(rate)}")
    tokens = [sum(r.completion_tokens for r in rs if r.ok) for rs in (plain, spec)]
    print(f"\noutput tokens per second ({CPU_NOTE}):")
    print(f"  plain  {tokens[0] / plain_s:8.1f} tok/s ({tokens[0]} tokens in {plain_s:.2f} s)")
    print(f"  dflash {tokens[1] / spec_s:8.1f} tok/s ({tokens[1]} tokens in {spec_s:.2f} s)")
    lossless = all(equal)
    print(f"\nevery DFlash answer equal to the plain server's: {'yes' if lossless else 'NO'} "
          f"({sum(equal)}/{len(equal)})")
    return lossless


def run_server_demo(max_tokens: int = 48, logs: Path | None = None) -> int:
    if importlib.util.find_spec("sglang") is None:
        print("sglang-dflash demo: serves the bundled pair through SGLang, which is not "
              "installed here. `make demo` installs the lean CPU SGLang stack; or run "
              "`sglang-dflash demo --reference` for the pure-torch reference loop.", file=sys.stderr)
        return 2
    from .reference.tiny_pair import DEMO_PROMPTS
    from .reference.tiny_qwen3 import DRAFTER_DIR
    from .config import load_drafter_config

    t0 = time.time()
    logs = logs or Path(tempfile.mkdtemp(prefix="sglang-dflash-demo-"))
    logs.mkdir(parents=True, exist_ok=True)
    block_size = load_drafter_config(DRAFTER_DIR).block_size
    print("sglang-dflash demo: the bundled tiny Qwen3 pair through two real `sglang serve` "
          "processes on CPU, fp32,\none plain and one with --speculative-algorithm dflash "
          f"(block {block_size}). Both run with the development\nCPU shims "
          "(sglang_dflash.dev.cpu_shims: torch-native attention, a torch rotary op, a "
          f"torchvision stub).\nServer logs: {logs}", flush=True)
    servers = _start_servers(logs)
    try:
        items = [PromptItem(f"demo-{i}", "raw", text=p) for i, p in enumerate(DEMO_PROMPTS)]
        s = Settings(model="tiny", completions=True, max_tokens=max_tokens, temperature=0.0,
                     spec_details=True, timeout_s=300, api_key=None)
        for server in servers.values():
            run_request(server.url(), items[0], s)  # warm-up, untimed
        print(f"\n{len(items)} prompts through /v1/completions, all at once, greedy, "
              f"max_tokens {max_tokens}:\n", flush=True)
        plain, plain_s = _send_all(servers["plain"].url(), items, s)
        spec, spec_s = _send_all(servers["dflash"].url(), items, s)
        lossless = _report(DEMO_PROMPTS, plain, spec, plain_s, spec_s, block_size)
    finally:
        for server in servers.values():
            server.stop()
    print(f"both servers stopped; done in {time.time() - t0:.0f} s")
    return 0 if lossless else 1
