"""`sglang-dflash demo`: the bundled tiny pair through the reference DFlash loop."""

from __future__ import annotations

import time

import torch

from ..backend import get_ops
from .loop import generate_dflash, generate_plain
from ..acceptance import acceptance_stats
from .offline import teacher_forced_commit_lens
from .sampling import SamplingParams
from .tiny_pair import DEMO_PROMPTS, decode, encode, load_tiny_pair


def use_ops(target, drafter, ops) -> None:
    """Point the models at one op backend (chosen once; no fallback)."""
    target.kda_commit_op = ops.kda_commit
    drafter.ops = ops


def _bar(fraction: float, width: int = 30) -> str:
    return "#" * round(fraction * width)


def run_demo(backend: str = "torch", max_new_tokens: int = 64, block_size: int | None = None) -> int:
    torch.manual_seed(0)
    t0 = time.time()
    target, drafter = load_tiny_pair()
    ops = get_ops(backend)
    use_ops(target, drafter, ops)
    L = block_size or drafter.cfg.block_size
    prompts = [encode(p) for p in DEMO_PROMPTS]
    params = [SamplingParams(max_new_tokens=max_new_tokens)] * len(prompts)
    print(f"tiny pair: target {target.config.num_hidden_layers} layers "
          f"({','.join(target.config.layer_kinds)}), drafter {drafter.cfg.num_hidden_layers} layers, "
          f"block {L}, backend {backend}; {len(prompts)} prompts, greedy, {max_new_tokens} new tokens\n")

    plain = generate_plain(target, prompts, params)
    spec = generate_dflash(target, drafter, prompts, params, ops, block_size=L)
    lossless = all(p.tokens == s.tokens for p, s in zip(plain, spec))
    for text, p, s in zip(DEMO_PROMPTS, plain, spec):
        mark = "==" if p.tokens == s.tokens else "!="
        print(f"  {text!r:28} -> {decode(s.tokens)!r}  [{mark} greedy, tau {s.acceptance_length:.2f}]")

    online = acceptance_stats([n for r in spec for n in r.commit_lens], L)
    # teacher forcing walks the plain greedy continuations already decoded above
    walked = teacher_forced_commit_lens(target, drafter, ops, prompts, [p.tokens for p in plain], L)
    offline = acceptance_stats([n for per in walked for n in per], L)
    generated = sum(len(r.tokens) for r in spec)
    forwards = online.steps + len(prompts)  # one prefill per request, one verify per step
    print(f"\nonline tau (tokens per verify step): {online.tau:.3f} over {online.steps} steps")
    print(f"offline tau (teacher-forced):        {offline.tau:.3f}")
    print(f"tokens per target forward:           {generated / forwards:.3f} "
          f"(plain decoding: 1.000)")
    print("\nP(draft position j accepted):")
    for j, rate in enumerate(online.position_accept_rate, start=1):
        print(f"  {j:>2} {rate:6.3f} {_bar(rate)}")
    print("\ntokens emitted per step (commit_len): " +
          " ".join(f"{n}:{c}" for n, c in enumerate(online.commit_len_counts) if c))
    print(f"\nlossless (DFlash output == plain greedy, token for token): {'yes' if lossless else 'NO'}")
    print(f"done in {time.time() - t0:.1f}s")
    return 0 if lossless else 1
