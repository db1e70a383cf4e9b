"""`sglang-dflash bench offline`: teacher-forced acceptance (tau) of a drafter on a target.

The target decodes each prompt greedily; one target forward over prompt + continuation
gives every position's features; the drafter then walks blocks through the continuation
(no verify forward). This is the metric DFlash drafters are published with, and on the
bundled tiny pair it reproduces the reference loop's online tau exactly.

``--verify-width 2,4,8,16`` also walks the same continuations at each verify width W two
ways: "draft L, verify W" (this plugin: the drafter drafts its trained block of L, the
target checks the first W positions) and "draft W, verify W" (engines without a verify
width: the block itself shrinks to W, a context the drafter never saw in training).
Both give tau and the per-position acceptance at each W.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from ..backend import BACKENDS, get_ops
from ..cli_types import int_list
from ..acceptance import acceptance_stats
from ..reference.offline import teacher_forced_commit_lens
from ..reference.sampling import SamplingParams
from .plots import write_offline_plot, write_verify_width_plot

TINY = "tiny"
# --draft-kv-dtype: SGLang's --speculative-draft-kv-cache-dtype spellings, plus float32;
# None keeps the drafter's own dtype
DRAFT_KV_DTYPES = {"auto": None, "float32": torch.float32, "bf16": torch.bfloat16,
                   "bfloat16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}


def add_offline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=TINY,
                   help="target checkpoint dir, or 'tiny' for the bundled tiny Kimi-Linear pair "
                        "(default). A non-tiny target loads through transformers.")
    p.add_argument("--drafter", default=None,
                   help="DFlash drafter checkpoint dir (default: the bundled tiny drafter)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="JSONL file, one {\"prompt\": ...} per line (default: the tiny pair's prompts, "
                        "or the bundled benchmark set for other targets)")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N after shuffling")
    p.add_argument("--shuffle-seed", type=int, default=None, help="shuffle the prompts with this seed")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=None,
                   help="the draft block L (default: the drafter's trained block_size)")
    p.add_argument("--verify-width", type=int_list(2, "verify widths", distinct_sorted=True), default=None,
                   metavar="W[,W...]",
                   help="also walk each verify width W (2..L) as 'draft L, verify W' and as "
                        "'draft W, verify W'; adds result.json['verify_widths'] and verify_width.png")
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--draft-kv-dtype", choices=list(DRAFT_KV_DTYPES), default="auto",
                   help="dtype of the draft K/V pool, as the server's --speculative-draft-kv-cache-dtype "
                        "(auto: the drafter's dtype; fp8_e4m3: e4m3 with fixed per-(layer, KV head) scales)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the target's own modeling code (transformers targets only; "
                        "the drafter never runs checkpoint code)")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="feed prompts raw instead of through the tokenizer's chat template")
    p.add_argument("--out", type=Path, default=Path("out/bench_offline"),
                   help="directory for result.json and plots")


def _prompt_texts(args) -> list[str]:
    """User text of each prompt: a JSONL file, else the tiny pair's prompts or the
    bundled benchmark set (formatted as the online benchmark formats it)."""
    from .prompts import load_prompts
    from ..reference.tiny_pair import DEMO_PROMPTS

    if args.prompts is None and args.target == TINY:
        return list(DEMO_PROMPTS)
    items = load_prompts(args.prompts, None, None, completions=True)
    return [item.completion_prompt() for item in items]


def select_prompts(prompts: list[str], num: int | None, seed: int | None) -> list[str]:
    prompts = list(prompts)
    if seed is not None:
        random.Random(seed).shuffle(prompts)
    return prompts[:num] if num else prompts


def _tiny_setup(args, texts):
    from ..reference.demo import use_ops
    from ..reference.loop import generate_plain
    from ..reference.tiny_pair import DRAFTER_DIR, encode, load_tiny_pair

    target, drafter = load_tiny_pair(drafter_dir=args.drafter or DRAFTER_DIR)
    use_ops(target, drafter, get_ops(args.backend))

    def continue_greedy(prompt: list[int]) -> list[int]:
        params = SamplingParams(max_new_tokens=args.max_new_tokens)
        return generate_plain(target, [prompt], [params])[0].tokens

    return target, drafter, [encode(t) for t in texts], continue_greedy


def _transformers_setup(args, texts):
    from transformers import AutoTokenizer

    from ..reference.hf_target import HFTarget
    from ..drafter import load_drafter

    if args.drafter is None:
        raise SystemExit("bench offline: --drafter is required with a transformers --target")
    tokenizer = AutoTokenizer.from_pretrained(args.target, trust_remote_code=args.trust_remote_code)
    target = HFTarget.from_pretrained(args.target, args.trust_remote_code)
    drafter = load_drafter(args.drafter, target.hidden_size)
    drafter.ops = get_ops(args.backend)
    if args.chat_template and tokenizer.chat_template:
        # tokenized as SGLang's chat endpoint does: the template's text, no special tokens
        # added (a template writes its own BOS)
        prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                           add_generation_prompt=True, tokenize=False),
                             add_special_tokens=False)["input_ids"]
                   for t in texts]
    else:
        prompts = [tokenizer(t)["input_ids"] for t in texts]

    def continue_greedy(prompt: list[int]) -> list[int]:
        return target.greedy_continuation(prompt, args.max_new_tokens)

    return target, drafter, prompts, continue_greedy


def run_offline(args) -> dict:
    texts = select_prompts(_prompt_texts(args), args.num_prompts, args.shuffle_seed)
    setup = _tiny_setup if args.target == TINY else _transformers_setup
    target, drafter, prompts, continue_greedy = setup(args, texts)
    drafter.kv_dtype = DRAFT_KV_DTYPES[args.draft_kv_dtype]
    pool_dtype = drafter.kv_dtype or drafter.fc.weight.dtype
    L = args.block_size or drafter.cfg.block_size
    t0 = time.time()
    continuations = []
    for i, prompt in enumerate(prompts, start=1):
        continuations.append(continue_greedy(prompt))
        print(f"\rgreedy continuations {i}/{len(prompts)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    lens = teacher_forced_commit_lens(target, drafter, drafter.ops, prompts, continuations, L)
    stats = acceptance_stats([n for per in lens for n in per], L)
    widths = None
    if args.verify_width:
        widths = verify_width_sweep(target, drafter, prompts, continuations, L, args.verify_width)
    return {
        "metric": "offline teacher-forced acceptance length (tokens per verify step, bonus included)",
        "target": args.target, "drafter": args.drafter or TINY, "block_size": L,
        "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "shuffle_seed": args.shuffle_seed, "backend": args.backend,
        "draft_kv_dtype": args.draft_kv_dtype, "draft_kv_pool": str(pool_dtype).removeprefix("torch."),
        "seconds": round(time.time() - t0, 3),
        **stats.to_dict(),
        "per_prompt_tau": [sum(p) / len(p) if p else 0.0 for p in lens],
        "verify_widths": widths,
    }


def verify_width_sweep(target, drafter, prompts, continuations, L: int, widths: list[int]) -> list[dict]:
    """Per W: teacher-forced figures of 'draft L, verify W' and of 'draft W, verify W'."""
    if widths[-1] > L:
        raise ValueError(f"--verify-width {widths[-1]} exceeds the draft block {L}")
    rows = []
    for W in widths:
        row = {"verify_width": W}
        for key, block in (("draft_trained_block", L), ("draft_shrunk_block", W)):
            lens = teacher_forced_commit_lens(target, drafter, drafter.ops, prompts, continuations, block, W)
            row[key] = {"block_size": block, **acceptance_stats([n for per in lens for n in per], W).to_dict()}
        rows.append(row)
    return rows


def print_width_table(rows: list[dict]) -> None:
    L = rows[-1]["draft_trained_block"]["block_size"]
    print(f"teacher-forced tau by verify width W (draft {L}, verify W | draft W, verify W):")
    print(f"{'W':>3} {'draft L':>8} {'draft W':>8} {'gain':>7}  P(draft j accepted), draft L")
    for row in rows:
        full, shrunk = row["draft_trained_block"], row["draft_shrunk_block"]
        gain = full["tau"] / shrunk["tau"] - 1 if shrunk["tau"] else float("nan")
        curve = " ".join(f"{p:.2f}" for p in full["position_accept_rate"])
        print(f"{row['verify_width']:>3} {full['tau']:>8.3f} {shrunk['tau']:>8.3f} {gain:>+7.1%}  {curve}")


def main_offline(args) -> int:
    try:
        result = run_offline(args)
    except ValueError as e:  # bad prompt file or arguments: say which, no traceback
        print(f"bench offline: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    write_offline_plot(result, args.out / "acceptance.png")
    written = [args.out / "result.json", args.out / "acceptance.png"]
    print(f"offline tau {result['tau']:.3f} over {result['steps']} steps "
          f"({result['num_prompts']} prompts, block {result['block_size']}, draft K/V {result['draft_kv_pool']})")
    if result["verify_widths"]:
        print_width_table(result["verify_widths"])
        if write_verify_width_plot(result, args.out / "verify_width.png"):
            written.append(args.out / "verify_width.png")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
