"""`sglang-dflash bench online`: acceptance and speed of a live OpenAI-compatible server.

Streams a prompt set at each level of a concurrency sweep and reports per level the
acceptance length tau (tokens per verify step, bonus included), output tok/s, TTFT,
inter-chunk latency (ITL) and per-token latency (TPOT) percentiles, and the speed-up over
a baseline server (same prompts, no speculation). Stdlib HTTP only: it runs against our
plugin, stock SGLang or vLLM.

Where tau comes from (SGLang 0.5.23, `entrypoints/openai/serving_chat.py` and
`managers/tokenizer_manager.py`): the request sets `return_spec_tokens_details: true`;
the last stream chunk then carries `sglext.spec_tokens_details` with `spec_accept_length`
(= completion_tokens / spec_verify_ct), `spec_verify_ct` and
`spec_correct_drafts_histogram` (verify steps counted per accept_len). Level tau is
sum(completion_tokens) / sum(spec_verify_ct). Without per-request stats, SGLang's
`/server_info` `internal_states[0].avg_spec_accept_length` is used and labelled as what it
is (an average over the server's lifetime, not this level alone); otherwise tau is n/a.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from .client import RequestResult, Settings, get_json, run_request
from .prompts import DATASETS, PromptItem, load_prompts

DEFAULT_LEVELS = (1, 4, 16, 32)


def percentiles(values: list[float]) -> dict:
    """p50 / p90 / p99 (linear interpolation), mean and count; None values when empty."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}
    xs = sorted(values)

    def q(p: float) -> float:
        pos = (len(xs) - 1) * p
        lo = int(pos)
        return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": sum(xs) / len(xs), "n": len(xs)}


def level_tau(ok: list[RequestResult], server_avg: float | None) -> tuple[float | None, str | None]:
    if ok and all(r.spec_verify_ct for r in ok):
        return (sum(r.completion_tokens for r in ok) / sum(r.spec_verify_ct for r in ok),
                "per-request sglext.spec_tokens_details (completion_tokens / spec_verify_ct)")
    if server_avg is not None:
        return server_avg, "/server_info avg_spec_accept_length (server lifetime, not this level)"
    return None, None


def _histogram(ok: list[RequestResult]) -> list[int] | None:
    hists = [r.spec_correct_drafts_histogram for r in ok if r.spec_correct_drafts_histogram]
    if not hists:
        return None
    total = [0] * max(len(h) for h in hists)
    for h in hists:
        for accept_len, count in enumerate(h):
            total[accept_len] += int(count)
    return total


def summarize_level(concurrency: int, results: list[RequestResult], wall_s: float,
                    server_avg: float | None) -> dict:
    """Everything measured at one concurrency level, JSON-ready."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    tau, source = level_tau(ok, server_avg)
    return {
        "concurrency": concurrency, "requests": len(results), "ok": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_s": wall_s, "output_tokens": tokens, "output_tok_s": tokens / wall_s,
        "requests_per_s": len(ok) / wall_s,
        "tokens_from_usage": all(r.tokens_from_usage for r in ok) if ok else None,
        "tau": tau, "tau_source": source,
        "tau_request_mean": (sum(r.spec_accept_length for r in ok) / len(ok)
                             if ok and all(r.spec_accept_length for r in ok) else None),
        "accept_len_histogram": _histogram(ok),
        "server_avg_spec_accept_length_lifetime": server_avg,
        "ttft_s": percentiles([r.ttft_s for r in ok]),
        "itl_s": percentiles([x for r in ok for x in r.itl_s]),
        "tpot_s": percentiles([(r.latency_s - r.ttft_s) / (r.completion_tokens - 1)
                               for r in ok if r.completion_tokens > 1]),
        "latency_s": percentiles([r.latency_s for r in ok]),
        "per_request": [{k: v for k, v in asdict(r).items() if k != "itl_s"} for r in results],
    }


def server_avg_tau(base_url: str, s: Settings) -> float | None:
    info = get_json(base_url, "/server_info", s.timeout_s, s.api_key) or {}
    states = info.get("internal_states") or [{}]
    return states[0].get("avg_spec_accept_length") if isinstance(states[0], dict) else None


def run_level(base_url: str, items: list[PromptItem], concurrency: int, num_requests: int,
              s: Settings, label: str = "") -> dict:
    """Send `num_requests` requests (cycling `items`) with at most `concurrency` in flight."""
    if concurrency < 1 or num_requests < 1:
        raise ValueError(f"concurrency and num_requests must be >= 1, "
                         f"got {concurrency} and {num_requests}")
    batch = [items[i % len(items)] for i in range(num_requests)]
    lock, done = threading.Lock(), {"n": 0, "failed": 0, "tokens": 0}
    t0 = time.perf_counter()

    def one(item: PromptItem) -> RequestResult:
        r = run_request(base_url, item, s)
        with lock:
            done["n"] += 1
            done["failed"] += not r.ok
            done["tokens"] += r.completion_tokens if r.ok else 0
            rate = done["tokens"] / (time.perf_counter() - t0)
            print(f"\r  {label}c={concurrency}: {done['n']}/{len(batch)} done, "
                  f"{done['failed']} failed, {rate:9.1f} tok/s", end="", file=sys.stderr,
                  flush=True)
        return r

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, batch))
    wall = time.perf_counter() - t0
    print(file=sys.stderr)
    return summarize_level(concurrency, results, wall, server_avg_tau(base_url, s))


def run_sweep(base_url: str, items: list[PromptItem], levels: list[int], s: Settings,
              requests_per_level: int | None, warmup: int, label: str = "") -> list[dict]:
    for i in range(warmup):
        r = run_request(base_url, items[i % len(items)], s)
        if not r.ok:
            raise SystemExit(f"bench online: warm-up request to {base_url} failed: {r.error}")
    return [run_level(base_url, items, c, requests_per_level or max(len(items), 2 * c), s,
                      label) for c in levels]


def speedups(levels: list[dict], baseline: list[dict]) -> list[dict]:
    return [{"concurrency": lv["concurrency"], "output_tok_s": lv["output_tok_s"],
             "baseline_output_tok_s": b["output_tok_s"],
             "speedup": lv["output_tok_s"] / b["output_tok_s"] if b["output_tok_s"] else None}
            for lv, b in zip(levels, baseline)]


def write_plots(result: dict, out: Path) -> list[str]:
    """tau and tok/s vs concurrency; the accept_len histogram when the server sent one."""
    try:
        import matplotlib
    except ImportError:
        print("bench online: matplotlib is not installed, so no plots (pip install "
              "'sglang-dflash[bench]'); result.json has every number", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    cs = [lv["concurrency"] for lv in levels]
    fig, (ax_tau, ax_tps) = plt.subplots(1, 2, figsize=(10, 4))
    taus = [float("nan") if lv["tau"] is None else lv["tau"] for lv in levels]
    ax_tau.plot(cs, taus, "o-")
    if all(lv["tau"] is None for lv in levels):
        ax_tau.text(0.5, 0.5, "tau n/a: no acceptance stats", ha="center",
                    transform=ax_tau.transAxes)
    ax_tau.set(xlabel="concurrency", ylabel="tau (tokens per verify step)", title="acceptance")
    ax_tps.plot(cs, [lv["output_tok_s"] for lv in levels], "o-", label="server")
    if result.get("baseline"):
        ax_tps.plot(cs, [lv["output_tok_s"] for lv in result["baseline"]["levels"]], "s--",
                    label="baseline")
    ax_tps.set(xlabel="concurrency", ylabel="output tok/s", title="throughput")
    ax_tps.legend()
    for ax in (ax_tau, ax_tps):
        ax.set_xscale("log")
        ax.set_xticks(cs, [str(c) for c in cs])
    fig.tight_layout()
    fig.savefig(out / "tau_and_throughput.png", dpi=120)
    plt.close(fig)
    written = ["tau_and_throughput.png"]
    hist_levels = [lv for lv in levels if lv["accept_len_histogram"]]
    if hist_levels:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(hist_levels)
        for k, lv in enumerate(hist_levels):
            h = lv["accept_len_histogram"]
            ax.bar([a + k * width for a in range(len(h))], [x / sum(h) for x in h], width,
                   label=f"c={lv['concurrency']}")
        ax.set(xlabel="accept_len (accepted drafts per verify step)",
               ylabel="fraction of verify steps", title="acceptance histogram")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "accept_len_histogram.png", dpi=120)
        plt.close(fig)
        written.append("accept_len_histogram.png")
    return written


def print_table(result: dict) -> None:
    speed = {row["concurrency"]: row["speedup"] for row in result["speedup"] or []}

    def f(x, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    print(f"{'conc':>5} {'ok':>5} {'tau':>6} {'tok/s':>9} {'speedup':>8} {'ttft p50':>9} "
          f"{'ttft p99':>9} {'itl p50':>8} {'itl p99':>8}  (seconds)")
    for lv in result["levels"]:
        c, t, i = lv["concurrency"], lv["ttft_s"], lv["itl_s"]
        print(f"{c:>5} {lv['ok']:>5} {f(lv['tau'], '.3f'):>6} {f(lv['output_tok_s'], '.1f'):>9} "
              f"{f(speed.get(c), '.2f'):>8} {f(t['p50'], '.3f'):>9} {f(t['p99'], '.3f'):>9} "
              f"{f(i['p50'], '.4f'):>8} {f(i['p99'], '.4f'):>8}")


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected concurrency levels >= 1, got {text!r}")
    return levels


def add_online_args(p: argparse.ArgumentParser) -> None:
    p.description = "\n\n".join(__doc__.split("\n\n")[:2])
    p.epilog = ("Writes OUT/result.json (config, server info, every level with every field and "
                "per-request stats, baseline levels, speed-up), OUT/tau_and_throughput.png and, "
                "when the server reports per-request histograms, OUT/accept_len_histogram.png. "
                + __doc__.split("\n\n")[2])
    p.add_argument("--url", default="http://127.0.0.1:30000",
                   help="base URL of the server under test (default %(default)s)")
    p.add_argument("--baseline-url", default=None,
                   help="the same model served without speculation; adds the speed-up")
    p.add_argument("--model", default=None, help="model name to send (default: first /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", type=Path, default=None,
                     help="JSONL: per line a string 'prompt' or a 'messages' list of "
                          "{role, content}; optional 'kind' (math, gsm8k, code, chat, raw; "
                          "default raw) picks the template, optional 'id'. Default: the bundled "
                          "40 math / gsm8k / code / chat prompts")
    src.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                     help="load from the Hugging Face hub (needs `datasets` and network)")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts")
    p.add_argument("--concurrency", type=_levels, default=list(DEFAULT_LEVELS),
                   help="comma-separated sweep (default 1,4,16,32)")
    p.add_argument("--requests-per-level", type=int, default=None,
                   help="requests per level, prompts cycled (default max(#prompts, 2 x level))")
    p.add_argument("--max-tokens", type=int, default=256, help="output tokens per request")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--completions", action="store_true",
                   help="raw /v1/completions, no chat template (default: /v1/chat/completions, "
                        "the server applies its chat template)")
    p.add_argument("--no-spec-details", action="store_true",
                   help="do not send SGLang's return_spec_tokens_details (strict servers)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests before each sweep")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request socket timeout, s")
    p.add_argument("--out", type=Path, default=Path("out/bench_online"),
                   help="directory for result.json and the PNG plots (default %(default)s)")


def _settings(args, url: str) -> Settings:
    model = args.model
    if model is None:
        try:
            models = get_json(url, "/v1/models", args.timeout, args.api_key) or {}
        except OSError as e:
            raise SystemExit(f"bench online: cannot reach {url} ({e}); is the server up?")
        if not models.get("data"):
            raise SystemExit(f"bench online: {url}/v1/models lists no model; pass --model")
        model = models["data"][0]["id"]
    return Settings(model=model, completions=args.completions, max_tokens=args.max_tokens,
                    temperature=args.temperature, spec_details=not args.no_spec_details,
                    timeout_s=args.timeout, api_key=args.api_key)


def _bench_server(args, url: str, items: list[PromptItem], label: str) -> dict:
    s = _settings(args, url)
    return {"url": url, "model": s.model,
            "server_info": get_json(url, "/server_info", s.timeout_s, s.api_key),
            "levels": run_sweep(url, items, args.concurrency, s, args.requests_per_level,
                                args.warmup, label)}


def main_online(args) -> int:
    for name in ("max_tokens", "num_prompts", "requests_per_level"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"bench online: --{name.replace('_', '-')} must be >= 1")
    try:
        items = load_prompts(args.prompts, args.dataset, args.num_prompts, args.completions)
    except ValueError as e:
        raise SystemExit(f"bench online: {e}")
    print(f"bench online: {len(items)} prompts, levels {args.concurrency}", file=sys.stderr)
    server = _bench_server(args, args.url, items, "")
    result = {"tool": "sglang-dflash bench online",
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "config": {k: str(v) if isinstance(v, Path) else v
                         for k, v in vars(args).items() if k not in ("func", "api_key")},
              "server": {k: v for k, v in server.items() if k != "levels"},
              "levels": server["levels"], "baseline": None, "speedup": None}
    if args.baseline_url:
        result["baseline"] = _bench_server(args, args.baseline_url, items, "baseline ")
        result["speedup"] = speedups(result["levels"], result["baseline"]["levels"])
    args.out.mkdir(parents=True, exist_ok=True)
    result["plots"] = write_plots(result, args.out)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out / 'result.json'} and {', '.join(result['plots'])}")
    failed = [lv["concurrency"] for lv in result["levels"] if lv["ok"] == 0]
    if failed:
        print(f"bench online: every request failed at concurrency {failed}", file=sys.stderr)
    return 1 if failed else 0
