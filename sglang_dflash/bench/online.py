"""`sglang-dflash bench online`: acceptance and speed of a live OpenAI-compatible server.

Streams a prompt set at each level of a concurrency sweep and reports per level the
acceptance length tau, the per-position acceptance, output tok/s, TTFT, inter-chunk
latency (ITL) and per-token latency (TPOT) percentiles, and the speed-up over a baseline
server (same prompts, no speculation). Stdlib HTTP only: it runs against our plugin,
stock SGLang or vLLM.

Where tau comes from (SGLang 0.5.23, `entrypoints/openai/serving_chat.py` and
`managers/tokenizer_manager.py`): the request sets `return_spec_tokens_details: true`;
the last stream chunk then carries `sglext.spec_tokens_details` with `spec_verify_ct`,
`spec_accept_length` and `spec_correct_drafts_histogram` (verify steps counted by
accepted drafts). The headline tau is tokens per verify step: sum(completion_tokens - 1)
/ sum(spec_verify_ct) over the requests that had verify steps, the first token of each
request (sampled by the prefill, not by a verify) left out, which is the quantity
`bench offline`, the reference loop and SGLang's server-level `avg_spec_accept_length`
measure. SGLang's per-request `spec_accept_length` counts that first token too; it is
reported beside tau, labelled. Requests with no verify step (max_tokens 1, a stop at the
first token) are counted, not averaged in; without per-request stats tau is n/a.
`/server_info`'s running average is recorded in the JSON, never shown as tau.

Per-position acceptance comes two ways: from the per-request histograms (histogram
index = accepted drafts, at most W - 1 for the server's verify width W =
`speculative_num_draft_tokens`), and, from a server running this plugin, from the
worker's server-wide counts in `/server_info` (`internal_states[0].dflash_acceptance`),
read before and after each level: the difference is that level's `server_acceptance`
(other clients' traffic in the meantime is counted too).
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

from ..acceptance import from_accepted_histogram
from .client import RequestResult, Settings, get_json, run_request
from .plots import write_online_plots

# the plugin's /server_info key (sglang_dflash.plugin.SERVER_INFO_KEY; not imported, so
# this module stays free of SGLang)
SERVER_INFO_KEY = "dflash_acceptance"
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


def level_acceptance(ok: list[RequestResult], verify_width: int | None,
                     speculative: bool = False) -> dict:
    """tau per verify step (first token excluded) over the requests that had verify steps,
    how many had none or no stats, SGLang's own figure, and the per-position curve.

    SGLang sends no spec_tokens_details for a request that never reached a verify step,
    so on a server known to speculate (``speculative``) a one-token answer without stats
    counts as one with no verify step (every later token comes from a verify)."""
    counted = [r for r in ok if r.tokens_from_usage]
    stepped = [r for r in counted if r.spec_verify_ct]
    no_verify = [r for r in counted if r.spec_verify_ct == 0 or (
        speculative and r.spec_verify_ct is None and r.completion_tokens <= 1)]
    steps = sum(r.spec_verify_ct for r in stepped)
    hists = [r.spec_correct_drafts_histogram for r in stepped if r.spec_correct_drafts_histogram]
    histogram = None
    if hists:
        histogram = [0] * max(len(h) for h in hists)
        for h in hists:
            for accepted, count in enumerate(h):
                histogram[accepted] += int(count)
    rates = None
    if histogram:
        W = max(verify_width or 0, len(histogram))
        rates = list(from_accepted_histogram(histogram, W).position_accept_rate)
    return {
        "tau": sum(r.completion_tokens - 1 for r in stepped) / steps if steps else None,
        "tau_source": ("per-request sglext.spec_tokens_details: sum(completion_tokens - 1) / "
                       "sum(spec_verify_ct)") if steps else None,
        "tau_requests": len(stepped), "verify_steps": steps,
        "no_verify_requests": len(no_verify),
        "no_stats_requests": len(ok) - len(stepped) - len(no_verify),
        "sglang_accept_length": (sum(r.completion_tokens for r in stepped) / steps
                                 if steps else None),
        "sglang_accept_length_request_mean": (
            sum(r.spec_accept_length for r in stepped) / len(stepped)
            if stepped and all(r.spec_accept_length is not None for r in stepped) else None),
        "accept_len_histogram": histogram,
        "position_accept_rate": rates,
    }


def summarize_level(concurrency: int, results: list[RequestResult], wall_s: float,
                    server_avg: float | None, verify_width: int | None = None,
                    speculative: bool = False, server_acceptance: dict | None = None) -> dict:
    """Everything measured at one concurrency level, JSON-ready."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "concurrency": concurrency, "requests": len(results), "ok": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_s": wall_s, "output_tokens": tokens, "output_tok_s": tokens / wall_s,
        "requests_per_s": len(ok) / wall_s,
        "tokens_from_usage": all(r.tokens_from_usage for r in ok) if ok else None,
        **level_acceptance(ok, verify_width, speculative),
        "server_info_avg_spec_accept_length": server_avg,
        "server_acceptance": server_acceptance,
        "ttft_s": percentiles([r.ttft_s for r in ok]),
        "itl_s": percentiles([x for r in ok for x in r.itl_s]),
        "tpot_s": percentiles([(r.latency_s - r.ttft_s) / (r.completion_tokens - 1)
                               for r in ok if r.completion_tokens > 1]),
        "latency_s": percentiles([r.latency_s for r in ok]),
        "per_request": [{k: v for k, v in asdict(r).items() if k not in ("itl_s", "text")}
                        for r in results],
    }


def server_state(base_url: str, s: Settings) -> dict:
    """``/server_info``'s ``internal_states[0]`` (SGLang's scheduler state), {} if none."""
    info = get_json(base_url, "/server_info", s.timeout_s, s.api_key) or {}
    states = info.get("internal_states") or [{}]
    return states[0] if isinstance(states[0], dict) else {}


def acceptance_delta(before: dict, after: dict) -> dict | None:
    """Figures of the verify steps a server counted between two ``server_state`` reads,
    from this plugin's ``dflash_acceptance`` counts (None from any other server)."""
    a, b = after.get(SERVER_INFO_KEY), before.get(SERVER_INFO_KEY)
    if not isinstance(a, dict) or not isinstance(a.get("accepted_drafts_histogram"), list):
        return None
    hist = [int(x) for x in a["accepted_drafts_histogram"]]
    if isinstance(b, dict) and len(b.get("accepted_drafts_histogram") or []) == len(hist):
        hist = [x - int(y) for x, y in zip(hist, b["accepted_drafts_histogram"])]
    if min(hist, default=0) < 0:
        raise ValueError(f"{SERVER_INFO_KEY} counts went down during the level (server restarted?)")
    stats = from_accepted_histogram(hist, int(a.get("verify_width") or len(hist)))
    return {"source": f"/server_info internal_states[0].{SERVER_INFO_KEY}, after minus before the level",
            "block_size": a.get("block_size"), "verify_width": a.get("verify_width"),
            "accepted_drafts_histogram": hist, **stats.to_dict()}


def server_verify_width(server_info: dict | None) -> int | None:
    """The verify width W a SGLang server runs (speculative_num_draft_tokens), if it says."""
    value = (server_info or {}).get("speculative_num_draft_tokens")
    return value if isinstance(value, int) and value >= 2 else None


def server_speculates(server_info: dict | None) -> bool:
    """Whether a SGLang server says it runs speculative decoding."""
    return bool((server_info or {}).get("speculative_algorithm"))


def run_level(base_url: str, items: list[PromptItem], concurrency: int, num_requests: int,
              s: Settings, label: str = "", server_info: dict | None = None) -> dict:
    """Send `num_requests` requests (cycling `items`) with at most `concurrency` in flight."""
    if concurrency < 1 or num_requests < 1:
        raise ValueError(f"concurrency and num_requests must be >= 1, "
                         f"got {concurrency} and {num_requests}")
    batch = [items[i % len(items)] for i in range(num_requests)]
    lock, done = threading.Lock(), {"n": 0, "failed": 0, "tokens": 0}
    before = server_state(base_url, s)
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
    after = server_state(base_url, s)
    return summarize_level(concurrency, results, wall, after.get("avg_spec_accept_length"),
                           server_verify_width(server_info), s.spec_details and server_speculates(server_info),
                           acceptance_delta(before, after))


def run_sweep(base_url: str, items: list[PromptItem], levels: list[int], s: Settings,
              requests_per_level: int | None, warmup: int, label: str = "",
              server_info: dict | None = None) -> list[dict]:
    for i in range(warmup):
        r = run_request(base_url, items[i % len(items)], s)
        if not r.ok:
            raise SystemExit(f"bench online: warm-up request to {base_url} failed: {r.error}")
    return [run_level(base_url, items, c, requests_per_level or max(len(items), 2 * c), s,
                      label, server_info) for c in levels]


def speedups(levels: list[dict], baseline: list[dict]) -> list[dict]:
    return [{"concurrency": lv["concurrency"], "output_tok_s": lv["output_tok_s"],
             "baseline_output_tok_s": b["output_tok_s"],
             "speedup": lv["output_tok_s"] / b["output_tok_s"] if b["output_tok_s"] else None}
            for lv, b in zip(levels, baseline)]


def print_table(result: dict) -> None:
    speed = {row["concurrency"]: row["speedup"] for row in result["speedup"] or []}

    def f(x, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    print("tau: tokens per verify step, each request's first (prefill) token excluded; "
          "sglang: SGLang's accept length, which counts it; server: the worker's own counts "
          "(/server_info dflash_acceptance, untrimmed commit lengths)")
    print(f"{'conc':>5} {'ok':>5} {'tau':>6} {'sglang':>6} {'server':>6} {'no-vfy':>6} {'tok/s':>9} "
          f"{'speedup':>8} {'ttft p50':>9} {'ttft p99':>9} {'itl p50':>8} {'itl p99':>8}  (seconds)")
    for lv in result["levels"]:
        c, t, i = lv["concurrency"], lv["ttft_s"], lv["itl_s"]
        server_tau = (lv.get("server_acceptance") or {}).get("tau")
        print(f"{c:>5} {lv['ok']:>5} {f(lv['tau'], '.3f'):>6} {f(lv['sglang_accept_length'], '.3f'):>6} "
              f"{f(server_tau, '.3f'):>6} "
              f"{lv['no_verify_requests']:>6} {f(lv['output_tok_s'], '.1f'):>9} "
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
                "when the server reports per-request histograms, OUT/accept_len_histogram.png and "
                "OUT/position_acceptance.png. "
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
    p.add_argument("--num-prompts", type=int, default=None,
                   help="use N prompts, taken round-robin over the prompt kinds (math, code, ...)")
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


def _bench_server(args, url: str, items: list[PromptItem], role: str) -> dict:
    """One server's sweep; progress lines name it: `server under test URL` or `baseline URL`."""
    s = _settings(args, url)
    info = get_json(url, "/server_info", s.timeout_s, s.api_key)
    print(f"bench online: {role} {url} (model {s.model})", file=sys.stderr)
    return {"url": url, "model": s.model, "server_info": info,
            "levels": run_sweep(url, items, args.concurrency, s, args.requests_per_level,
                                args.warmup, f"{role} {url} ", info)}


def main_online(args) -> int:
    for name in ("max_tokens", "num_prompts", "requests_per_level"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"bench online: --{name.replace('_', '-')} must be >= 1")
    try:
        items = load_prompts(args.prompts, args.dataset, args.num_prompts, args.completions)
    except ValueError as e:
        raise SystemExit(f"bench online: {e}")
    print(f"bench online: {len(items)} prompts, levels {args.concurrency}", file=sys.stderr)
    server = _bench_server(args, args.url, items, "server under test")
    result = {"tool": "sglang-dflash bench online",
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "config": {k: str(v) if isinstance(v, Path) else v
                         for k, v in vars(args).items() if k not in ("func", "api_key")},
              "server": {k: v for k, v in server.items() if k != "levels"},
              "levels": server["levels"], "baseline": None, "speedup": None}
    if args.baseline_url:
        result["baseline"] = _bench_server(args, args.baseline_url, items, "baseline")
        result["speedup"] = speedups(result["levels"], result["baseline"]["levels"])
    args.out.mkdir(parents=True, exist_ok=True)
    result["plots"] = write_online_plots(result, args.out)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out / 'result.json'} and {', '.join(result['plots'])}")
    failed = [lv["concurrency"] for lv in result["levels"] if lv["ok"] == 0]
    if failed:
        print(f"bench online: every request failed at concurrency {failed}", file=sys.stderr)
    return 1 if failed else 0
