"""The reference engine end to end on the bundled tiny Kimi-Linear pair: tau and losslessness.

For each op backend and block size: plain greedy decoding with the target alone, then
DFlash decoding (``reference/loop.py``) over the bundled prompts, on the device given.
Lossless = DFlash emits exactly the plain tokens; tau = tokens per verify step. Exit 1
when any run is not lossless or drafts nothing (tau below 1.5). The bundled Qwen3 pair has
no incremental reference target (its HF wrapper only walks teacher-forced), so it is
covered by the CPU server tests, not here.

    python benchmarks/reference_e2e.py --device cuda --out OUT
    python benchmarks/reference_e2e.py --device cpu --backends torch --max-new 16 --out OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from sglang_dflash.backend import get_ops
from sglang_dflash.reference.demo import use_ops
from sglang_dflash.reference.loop import acceptance_length, generate_dflash, generate_plain
from sglang_dflash.reference.sampling import SamplingParams
from sglang_dflash.reference.tiny_pair import DEMO_PROMPTS, encode, load_tiny_pair

MIN_TAU = 1.5


def run(device: str, backends, blocks, max_new: int, prompts: int) -> list[dict]:
    target, drafter = load_tiny_pair()
    target, drafter = target.to(device), drafter.to(device)
    texts = DEMO_PROMPTS[:prompts]
    ids = [encode(t) for t in texts]
    params = [SamplingParams(max_new_tokens=max_new)] * len(ids)
    rows = []
    with torch.no_grad():
        for backend in backends:
            ops = get_ops(backend)
            use_ops(target, drafter, ops)
            start = time.perf_counter()
            plain = generate_plain(target, ids, params)
            plain_s = time.perf_counter() - start
            for L in blocks:
                start = time.perf_counter()
                spec = generate_dflash(target, drafter, ids, params, ops, block_size=L)
                row = {"backend": backend, "device": device, "block": L, "prompts": len(ids), "max_new": max_new,
                       "lossless": all(p.tokens == s.tokens for p, s in zip(plain, spec)),
                       "tau": acceptance_length(spec), "verify_steps": sum(len(s.commit_lens) for s in spec),
                       "plain_s": round(plain_s, 2), "dflash_s": round(time.perf_counter() - start, 2)}
                row["ok"] = row["lossless"] and row["tau"] >= MIN_TAU
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="reference_e2e.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", default=["triton", "torch"], choices=["triton", "torch"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=len(DEMO_PROMPTS))
    args = parser.parse_args(argv)
    rows = run(args.device, args.backends, args.blocks, args.max_new, args.prompts)
    ok = all(r["ok"] for r in rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reference_e2e.json").write_text(json.dumps({"ok": ok, "rows": rows}, indent=1))
    print(f"wrote {args.out / 'reference_e2e.json'}; {'lossless' if ok else 'MISMATCH OR NO ACCEPTANCE'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
