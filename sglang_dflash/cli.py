"""The `sglang-dflash` command: demo, check, bench, plan, serve."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", action="store_true",
                   help="run the pure-torch reference DFlash loop on the bundled Kimi-shaped pair "
                        "instead of SGLang servers (no SGLang needed)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="new tokens per prompt (default: 48 served, 64 with --reference)")
    p.add_argument("--logs", type=Path, default=None,
                   help="directory for the two servers' logs (default: a new temporary one)")
    ref = p.add_argument_group("with --reference")
    ref.add_argument("--backend", choices=("torch", "triton"), default="torch",
                     help="op backend: torch twins, or Triton kernels (CPU: interpreter, slow)")
    ref.add_argument("--block-size", type=int, default=None, help="default: the drafter's (16)")


def _main_demo(args) -> int:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise SystemExit("sglang-dflash demo: --max-new-tokens must be >= 1")
    if args.reference:
        from .reference.demo import run_demo

        return run_demo(backend=args.backend, max_new_tokens=args.max_new_tokens or 64,
                        block_size=args.block_size)
    from .demo import run_server_demo

    return run_server_demo(max_tokens=args.max_new_tokens or 48, logs=args.logs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sglang-dflash",
        description="DFlash block-diffusion speculative decoding for SGLang (Kimi-Linear and "
                    "standard targets). The plugin itself needs no command: install the package "
                    "and pass `--speculative-algorithm dflash` to `sglang serve`, with "
                    "`--speculative-draft-model-path DRAFTER` (its config.json block_size is the "
                    "draft block L, always drafted in full) and optionally "
                    "`--speculative-num-draft-tokens W` (alias --speculative-dflash-block-size): the "
                    "verify width, how many block positions the target checks, 2..L, default L; "
                    "`sglang-dflash plan` picks it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="serve the bundled tiny pair with two real SGLang servers on "
                                       "CPU (plain and DFlash), compare every answer, report tau "
                                       "and speeds; --reference: the pure-torch loop")
    _add_demo_args(demo)
    demo.set_defaults(func=_main_demo)

    from .check import add_check_args, main_check

    check = sub.add_parser("check", help="check a drafter checkpoint (and its target) without "
                                         "loading weights; lists every incompatibility")
    add_check_args(check)
    check.set_defaults(func=main_check)

    from .bench.offline import add_offline_args, main_offline
    from .bench.online import add_online_args, main_online

    bench = sub.add_parser("bench", help="acceptance benchmarks (online over HTTP, offline teacher-forced)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="KIND")
    online = bench_sub.add_parser("online", help="send a prompt set to any OpenAI-compatible server at "
                                                 "several concurrencies; tau, tok/s, TTFT, ITL; JSON + plots")
    add_online_args(online)
    online.set_defaults(func=main_online)
    offline = bench_sub.add_parser("offline", help="teacher-forced tau of a drafter on a target; JSON + plot")
    add_offline_args(offline)
    offline.set_defaults(func=main_offline)

    from .plan.planner import add_plan_args, main_plan

    plan = sub.add_parser("plan", help="the verify width W (--speculative-num-draft-tokens) that maximises "
                                       "tok/s per concurrency, from an acceptance curve and a step-time "
                                       "model of Kimi-Linear (or measured layer times); prints flag lines")
    add_plan_args(plan)
    plan.set_defaults(func=main_plan)

    from .serve import add_serve_args, main_serve

    serve = sub.add_parser("serve", help="launch `sglang serve` from a file in server_configs/, "
                                         "passing extra arguments through")
    add_serve_args(serve)
    serve.set_defaults(func=main_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
