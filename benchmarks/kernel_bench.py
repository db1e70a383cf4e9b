"""Kernel benchmark: every Triton op against its torch twin, in µs and GB/s, checked first.

On a CUDA device the cases run at Kimi-Linear / DFlash-drafter shapes (vocab 163840,
hidden 2304, drafter 32 query / 32 KV heads of 72 (the published drafter's geometry as
inferred from its file size), KDA 32 heads of 128 x 128, block 16,
batch 1..64, draft contexts 1k and 8k). Without CUDA, or with ``--smoke``, the same code
runs small irregular shapes as a correctness smoke (under ``TRITON_INTERPRET=1`` on CPU,
where the timings say nothing about performance; the JSON and the plot say so).

Each case runs op and twin on identical inputs (arguments written in place are cloned
for each), compares every output (floats by RMS error ratio, integers by the fraction
of differing elements), then times both. GB/s divide the bytes an op must move at least
(each input read once, each output written once; counted per case below) by its time.

    python benchmarks/kernel_bench.py --out out/kernels            # GPU: full table
    python benchmarks/kernel_bench.py --smoke --out out/smoke      # small shapes

Adding an op is one entry in ``_builders``: a function returning ``Case`` rows.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.testing

HBM_PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "B200": 8000.0}
# the fp8 (e4m3) draft K/V pool: both draft ops also run with it
FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class Case:
    name: str                                        # row label, e.g. "greedy_head B8"
    module: str                                      # sglang_dflash.kernels.<module> (twin: .naive.<module>)
    op: str                                          # function name in both modules
    make_inputs: Callable[[torch.device], tuple]     # positional arguments of one call
    nbytes: Callable[[tuple], int]                   # bytes the op must move at least
    outputs: tuple[str, ...]                         # names of the returned tensors or of `mutates`
    mutates: tuple[int, ...] = ()                    # argument positions written in place
    tol_ratio: float = 1e-5                          # float outputs: max RMS error ratio
    tol_mismatch: float = 0.0                        # integer outputs: max fraction that differ
    shape: dict = field(default_factory=dict)


def _size(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- accept ----

def _accept_greedy_inputs(B: int, L: int, V: int, E: int):
    def make(device):
        pred = torch.randint(0, V, (B, L), device=device)
        cand = torch.cat([torch.randint(0, V, (B, 1), device=device), pred[:, :-1]], dim=1)
        # one wrong draft at a random column (or none): accept lengths spread over 0..L-1
        wrong_at = torch.randint(1, L + 4, (B, 1), device=device)
        cols = torch.arange(L, device=device)[None, :]
        cand = torch.where(cols == wrong_at, (cand + 1) % V, cand)
        remaining = torch.randint(1, 4 * L, (B,), device=device)
        stops = torch.randint(-1, V, (B, E), device=device)
        stops[:, 0] = torch.where(torch.rand(B, device=device) < 0.3, pred[:, L // 2], -1)
        return cand, pred, remaining, stops
    return make


def _accept_outputs_bytes(cand: torch.Tensor) -> int:
    B, L = cand.shape
    # accept_len [B] + emitted [B, L] int64 + finished [B] bool
    return 8 * B + 8 * B * L + B


def _accept_greedy_bytes(args) -> int:
    return _size(*args) + _accept_outputs_bytes(args[0])


def _accept_sampled_inputs(B: int, L: int, V: int, E: int):
    def make(device):
        drafts = torch.randint(0, V, (B, L - 1), device=device)
        logits = torch.randn(B, L, V, device=device)
        # a spike on each draft makes p(draft) ~ 0.7-0.99, so accept lengths spread out
        spike = 4.0 + 8.0 * torch.rand(B, L - 1, 1, device=device)
        logits[:, :-1].scatter_add_(2, drafts[:, :, None], spike)
        probs = torch.softmax(logits, dim=-1)
        cand = torch.cat([torch.randint(0, V, (B, 1), device=device), drafts], dim=1)
        u_accept, u_sample = torch.rand(B, L, device=device), torch.rand(B, device=device)
        remaining = torch.randint(1, 4 * L, (B,), device=device)
        stops = torch.randint(-1, V, (B, E), device=device)
        return cand, probs, u_accept, u_sample, remaining, stops
    return make


def _accept_sampled_bytes(args) -> int:
    cand, probs, u_accept, u_sample, remaining, stops = args
    B, L, V = probs.shape
    # of probs only one row per request is sampled, and p(draft) gathered for L-1 drafts
    small = _size(cand, u_accept, u_sample, remaining, stops)
    return small + 4 * B * (V + L - 1) + _accept_outputs_bytes(cand)


def _accept_cases(batches, L, V) -> list[Case]:
    rows = []
    for B in batches:
        shape = dict(B=B, L=L, V=V)
        rows.append(Case(f"accept_greedy B{B}", "accept", "accept_greedy",
                         _accept_greedy_inputs(B, L, V, 3), _accept_greedy_bytes,
                         ("accept_len", "emitted", "finished"), shape=shape))
        rows.append(Case(f"accept_sampled B{B}", "accept", "accept_sampled",
                         _accept_sampled_inputs(B, L, V, 3), _accept_sampled_bytes,
                         ("accept_len", "emitted", "finished"), shape=shape))
    return rows


# ---- greedy_head ----

def _greedy_head_inputs(M: int, V: int, H: int, dtype: torch.dtype):
    def make(device):
        hidden = torch.randn(M, H, device=device).to(dtype)
        weight = (torch.randn(V, H, device=device) * 0.02).to(dtype)
        return hidden, weight, 0
    return make


def _greedy_head_cases(batches, L, V, H, dtype) -> list[Case]:
    # the drafter proposes L-1 tokens per request: M = B * (L - 1) rows
    return [Case(f"greedy_head B{B}", "greedy_head", "greedy_head",
                 _greedy_head_inputs(B * (L - 1), V, H, dtype),
                 lambda a: _size(a[0], a[1]) + 12 * a[0].shape[0], ("max_logit", "token"),
                 # near-ties may flip with the fp32 summation order
                 tol_mismatch=0.02, shape=dict(M=B * (L - 1), V=V, H=H, dtype=str(dtype)))
            for B in batches]


def _combine_shards_inputs(R: int, M: int, V: int):
    def make(device):
        maxes = torch.randn(R, M, device=device).round(decimals=1)  # ties across shards
        tokens = torch.randint(0, V, (R, M), device=device)
        return maxes, tokens
    return make


def _combine_shards_cases(batches, L, R, V) -> list[Case]:
    # tensor parallelism: R ranks' (max_logit, token) of the B * (L - 1) drafted rows
    return [Case(f"combine_shards B{B} R{R}", "greedy_head", "combine_shards",
                 _combine_shards_inputs(R, B * (L - 1), V),
                 lambda a: _size(*a) + 8 * a[0].shape[1], ("token",),
                 shape=dict(R=R, M=B * (L - 1)))
            for B in batches]


# ---- draft attention ----

def _fp8_scales(pool: torch.Tensor) -> torch.Tensor:
    """[Hkv] power-of-two scales that put each head's largest |entry| of pool [N, Hkv, D] below 448."""
    amax = pool.float().abs().amax(dim=(0, 2))
    return torch.exp2(torch.ceil(torch.log2(amax.clamp_min(1e-30) / 448))).contiguous()


def _draft_attention_inputs(B, L, Hq, Hkv, D, ctx, dtype, pool_dtype):
    def make(device):
        # ragged contexts up to ctx, scattered through a pool with spare slots
        lens = torch.randint(max(1, 3 * ctx // 4), ctx + 1, (B,), device=device)
        lens[0] = ctx
        N = B * ctx + 64
        # context rows as SGLang's req_to_token: a taller, wider table, rows in any order
        slot_table = torch.zeros(B + 3, ctx + 20, dtype=torch.int32, device=device)
        slot_rows = torch.randperm(B + 3, device=device)[:B]
        slot_table[slot_rows, :ctx] = torch.randperm(N, device=device)[: B * ctx].view(B, ctx).to(torch.int32)
        k_pool = torch.randn(N, Hkv, D, device=device)
        v_pool = torch.randn(N, Hkv, D, device=device)
        q = torch.randn(B, L, Hq, D, device=device).to(dtype)
        block_k = torch.randn(B, L, Hkv, D, device=device).to(dtype)
        block_v = torch.randn(B, L, Hkv, D, device=device).to(dtype)
        scales = ()
        if pool_dtype == FP8:
            from sglang_dflash.kernels.naive.draft_kv import quantize_fp8

            scales = (_fp8_scales(k_pool), _fp8_scales(v_pool))
            k_pool, v_pool = quantize_fp8(k_pool, scales[0]), quantize_fp8(v_pool, scales[1])
        return (q, k_pool.to(pool_dtype), v_pool.to(pool_dtype), slot_table, slot_rows, lens, block_k, block_v,
                D ** -0.5, *scales)
    return make


def _draft_attention_bytes(args) -> int:
    q, k_pool, _, slot_table, _, lens, block_k, block_v = args[:8]
    per_token = 2 * k_pool.shape[1] * k_pool.shape[2] * k_pool.element_size()  # K and V rows
    ctx_tokens = int(lens.sum())
    return ctx_tokens * (per_token + slot_table.element_size()) + 2 * _size(q) + _size(block_k, block_v)


def _draft_attention_cases(batches, contexts, L, Hq, Hkv, D, dtype, pool_dtype=None) -> list[Case]:
    pool_dtype = pool_dtype or dtype
    pool = "" if pool_dtype == dtype else f" pool {str(pool_dtype)[6:]}"
    return [Case(f"draft_attention B{B} ctx{ctx} H{Hq}/{Hkv}xD{D}{pool}", "draft_attention", "draft_attention",
                 _draft_attention_inputs(B, L, Hq, Hkv, D, ctx, dtype, pool_dtype), _draft_attention_bytes,
                 ("out",), tol_ratio=1e-2 if dtype != torch.float32 else 1e-5,
                 shape=dict(B=B, ctx=ctx, Hq=Hq, Hkv=Hkv, D=D, dtype=str(dtype), pool_dtype=str(pool_dtype)))
            for B in batches for ctx in contexts]


# ---- draft KV append ----

def _draft_kv_inputs(T, Ld, Hkv, D, dtype, pool_dtype):
    def make(device):
        N = T + 37
        kv = torch.randn(T, Ld, 2, Hkv, D, device=device).to(dtype)
        k_norm = (1.0 + 0.1 * torch.randn(Ld, D, device=device)).to(dtype)
        angles = torch.rand(T, D // 2, device=device) * 100.0
        slots = torch.randperm(N, device=device)[:T]
        k_pool = torch.zeros(Ld, N, Hkv, D, device=device, dtype=pool_dtype)
        v_pool = torch.zeros(Ld, N, Hkv, D, device=device, dtype=pool_dtype)
        # fp8 pools: one fixed scale, as the drafter's (448 x 2^-6 = 7, about 7 sigma of these inputs)
        scales = (torch.full((Ld, Hkv), 2.0 ** -6, device=device),) * 2 if pool_dtype == FP8 else ()
        return (kv, k_norm, angles.cos(), angles.sin(), slots, k_pool, v_pool, 1e-6, *scales)
    return make


def _draft_kv_bytes(args) -> int:
    kv, k_norm, cos, sin, slots, k_pool = args[:6]
    # the projections read once, written once (every element) in the pool's dtype
    return _size(kv) + kv.numel() * k_pool.element_size() + _size(k_norm, cos, sin, slots)


def _draft_kv_cases(batches, L, Ld, Hkv, D, dtype, pool_dtype=None) -> list[Case]:
    pool_dtype = pool_dtype or dtype
    pool = "" if pool_dtype == dtype else f" pool {str(pool_dtype)[6:]}"
    # a step commits up to L tokens per request; their K/V enter every draft layer
    return [Case(f"draft_kv_append B{B} H{Hkv}xD{D}{pool}", "draft_kv", "draft_kv_append",
                 _draft_kv_inputs(B * L, Ld, Hkv, D, dtype, pool_dtype), _draft_kv_bytes,
                 ("k_pool", "v_pool"), mutates=(5, 6),
                 tol_ratio=1e-2 if dtype != torch.float32 or pool_dtype == FP8 else 1e-5,
                 shape=dict(T=B * L, Ld=Ld, Hkv=Hkv, D=D, dtype=str(dtype), pool_dtype=str(pool_dtype)))
            for B in batches]


# ---- KDA commit ----

def _kda_inputs(B, L, H, K, V, C, W1, dtype):
    def make(device):
        N = B + 3
        state = 0.1 * torch.randn(N, H, K, V, device=device)
        conv_state = torch.randn(N, C, W1, device=device).to(dtype)
        slot_ids = torch.randperm(N, device=device)[:B]
        k = F.normalize(torch.randn(B, L, H, K, device=device), dim=-1).to(dtype)
        v = torch.randn(B, L, H, V, device=device).to(dtype)
        g = -0.1 * torch.rand(B, L, H, K, device=device)
        beta = torch.sigmoid(torch.randn(B, L, H, device=device)).to(dtype)
        conv_inputs = torch.randn(B, L, C, device=device).to(dtype)
        commit_len = torch.randint(1, L + 1, (B,), device=device, dtype=torch.int32)
        return state, conv_state, slot_ids, k, v, g, beta, conv_inputs, commit_len
    return make


def _kda_bytes(args) -> int:
    state, conv_state, slot_ids, k, v, g, beta, conv_inputs, commit_len = args
    B, L = k.shape[:2]
    steps = int(commit_len.sum())
    per_step = (k[0, 0].numel() * k.element_size() + v[0, 0].numel() * v.element_size()
                + g[0, 0].numel() * 4 + beta[0, 0].numel() * beta.element_size()
                + conv_inputs[0, 0].numel() * conv_inputs.element_size())
    # each touched state and conv window is read and written once
    return 2 * B * (_size(state[0]) + _size(conv_state[0])) + steps * per_step + _size(slot_ids, commit_len)


def _kda_cases(batches, L, H, K, V, C, W1, dtype) -> list[Case]:
    return [Case(f"kda_commit B{B}", "kda_commit", "kda_commit",
                 _kda_inputs(B, L, H, K, V, C, W1, dtype), _kda_bytes,
                 ("state", "conv_state"), mutates=(0, 1), tol_ratio=1e-4,
                 shape=dict(B=B, L=L, H=H, K=K, V=V, C=C, W1=W1, dtype=str(dtype)))
            for B in batches]


def _builders(smoke: bool) -> list[Case]:
    if smoke:
        # small and irregular: odd vocab, hidden not a tile multiple, ragged contexts
        return (_accept_cases((1, 3), 16, 301)
                + _greedy_head_cases((1, 3), 4, 301, 96, torch.float32)
                + _combine_shards_cases((1, 3), 4, 3, 301)
                + _draft_attention_cases((2,), (40,), 16, 4, 2, 16, torch.float32)
                # MHA with a head dim that is not a power of two: the masked-D paths
                + _draft_attention_cases((2,), (40,), 16, 4, 4, 24, torch.float32)
                + _draft_attention_cases((2,), (40,), 16, 4, 4, 24, torch.float32, FP8)
                + _draft_kv_cases((2,), 4, 2, 2, 16, torch.float32)
                + _draft_kv_cases((2,), 4, 2, 4, 24, torch.float32)
                + _draft_kv_cases((2,), 4, 2, 4, 24, torch.float32, FP8)
                + _kda_cases((2,), 4, 2, 16, 16, 24, 3, torch.float32))
    batches, bf16 = (1, 8, 32, 64), torch.bfloat16
    return (_accept_cases(batches, 16, 163840)
            + _greedy_head_cases(batches, 16, 163840, 2304, bf16)
            + _combine_shards_cases(batches, 16, 2, 163840)
            + _draft_attention_cases(batches, (1024, 8192), 16, 32, 32, 72, bf16)
            + _draft_attention_cases(batches, (1024, 8192), 16, 32, 32, 72, bf16, FP8)
            + _draft_kv_cases(batches, 16, 5, 32, 72, bf16)
            + _draft_kv_cases(batches, 16, 5, 32, 72, bf16, FP8)
            + _kda_cases(batches, 16, 32, 128, 128, 3 * 32 * 128, 3, bf16))


# ---- running ----

def _resolve(case: Case) -> tuple[Callable, Callable]:
    op = getattr(importlib.import_module(f"sglang_dflash.kernels.{case.module}"), case.op)
    twin = getattr(importlib.import_module(f"sglang_dflash.kernels.naive.{case.module}"), case.op)
    return op, twin


def _call(fn: Callable, args: tuple, case: Case) -> tuple[torch.Tensor, ...]:
    """One call on private copies of the in-place arguments; returns the outputs."""
    args = tuple(a.clone() if i in case.mutates else a for i, a in enumerate(args))
    result = fn(*args)
    if case.mutates:
        return tuple(args[i] for i in case.mutates)
    return result if isinstance(result, tuple) else (result,)


def _error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """RMS error ratio for floats, fraction of differing elements for integers."""
    if ref.shape != out.shape or ref.dtype != out.dtype:
        return math.inf
    if ref.numel() == 0:
        return 0.0
    if ref.is_floating_point():
        ref64, out64 = ref.double(), out.double()
        if not torch.isfinite(out64).all():
            return math.inf
        return float((ref64 - out64).pow(2).mean().sqrt() / (ref64.pow(2).mean().sqrt() + 1e-30))
    return float((ref != out).double().mean())


def _time_us(fn: Callable, device: torch.device) -> float:
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median") * 1e3
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def run_case(case: Case, device: torch.device) -> dict:
    torch.manual_seed(0)
    args = case.make_inputs(device)
    op, twin = _resolve(case)
    ref, out = _call(twin, args, case), _call(op, args, case)
    errors, ok = {}, True
    for name, r, o in zip(case.outputs, ref, out, strict=True):
        err = _error(r, o)
        tol = case.tol_ratio if r.is_floating_point() else case.tol_mismatch
        errors[name] = {"error": err if math.isfinite(err) else None, "kind": "rms_ratio" if r.is_floating_point() else "mismatch_frac",
                        "tol": tol}
        ok &= err <= tol
    nbytes = case.nbytes(args)
    op_us = _time_us(lambda: op(*args), device)
    twin_us = _time_us(lambda: twin(*args), device)
    return {"name": case.name, "op": case.op, "shape": case.shape, "bytes": nbytes,
            "op_us": op_us, "twin_us": twin_us, "speedup": twin_us / op_us,
            "op_GBps": nbytes / op_us / 1e3, "twin_GBps": nbytes / twin_us / 1e3,
            "check": errors, "ok": bool(ok)}


def _device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version()}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        info["gpu"] = name
        info["hbm_peak_GBps"] = next((v for k, v in HBM_PEAK_GBPS.items() if k in name), None)
    return info


def plot(result: dict, path: Path) -> bool:
    """The PNG; False when matplotlib is not installed (a bare GPU box: JSON only)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["cases"]
    names = [r["name"] for r in rows]
    y = range(len(rows))
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(14, 0.32 * len(rows) + 2), sharey=True)
    ax_t.barh([i - 0.2 for i in y], [r["twin_us"] for r in rows], height=0.4, label="torch twin")
    ax_t.barh([i + 0.2 for i in y], [r["op_us"] for r in rows], height=0.4, label="triton op")
    ax_t.set(xscale="log", xlabel="µs per call (log)", yticks=list(y), yticklabels=names)
    ax_t.invert_yaxis()
    ax_t.legend(loc="lower right")
    ax_b.barh([i - 0.2 for i in y], [r["twin_GBps"] for r in rows], height=0.4, label="torch twin")
    ax_b.barh([i + 0.2 for i in y], [r["op_GBps"] for r in rows], height=0.4, label="triton op")
    peak = result["env"].get("hbm_peak_GBps")
    if peak:
        ax_b.axvline(peak, color="k", ls="--", lw=1, label=f"HBM peak {peak:.0f} GB/s")
    ax_b.set(xlabel="GB/s (bytes moved at least / time)")
    ax_b.legend(loc="lower right")
    fig.suptitle(result["mode"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernel_bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for kernels.json and kernels.png")
    parser.add_argument("--smoke", action="store_true", help="small shapes (always so without CUDA)")
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    parser.add_argument("--tag", default="kernels", help="file stem of the JSON and PNG")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    smoke = args.smoke or not cuda
    if smoke and not cuda:
        mode = "CPU smoke: op vs twin on small shapes (Triton interpreter; timings are not performance)"
    elif smoke:
        mode = "GPU smoke: op vs twin on small irregular shapes (timings are launch-bound)"
    else:
        mode = "GPU benchmark at Kimi-Linear / DFlash drafter shapes"
    print(mode, flush=True)
    cases = [c for c in _builders(smoke) if args.only in c.name]
    if not cases:
        parser.error(f"--only {args.only!r} matches no case")
    rows = []
    for case in cases:
        row = run_case(case, device)
        rows.append(row)
        worst = ", ".join(f"{k} {'inf' if v['error'] is None else format(v['error'], '.1e')}"
                          for k, v in row["check"].items())
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['name']:<32} op {row['op_us']:>10.1f} µs "
              f"{row['op_GBps']:>8.1f} GB/s | twin {row['twin_us']:>10.1f} µs | x{row['speedup']:.1f} "
              f"| {worst}", flush=True)
    result = {"mode": mode, "smoke": smoke, "env": _device_info(device), "cases": rows,
              "all_ok": all(r["ok"] for r in rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
    png = args.out / f"{args.tag}.png"
    plotted = plot(result, png)
    print(f"wrote {args.out / (args.tag + '.json')}" + (f" and {png}" if plotted else " (no matplotlib: no plot)")
          + f"; {'all checks passed' if result['all_ok'] else 'SOME CHECKS FAILED'}")
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
