"""What a verify of W tokens costs against a decode step: one Kimi-Linear layer of each kind.

Times, for B requests, the decode step (B tokens, W = 1) and the verify of W tokens per
request (B x W tokens) of

- one MoE layer at Kimi-Linear's shapes: 256 experts of 2304 x 1024 (gate, up, down),
  top-8 of a sigmoid router with correction bias, renormalised and scaled, plus the shared
  expert. Expert GEMM: ``torch._grouped_mm`` (one grouped GEMM over the experts a step
  routes to; CUTLASS on sm90+), or ``--expert-gemm loop`` (one matmul per touched
  expert). Random weights: the router then spreads tokens close to independently, the
  pessimistic case for a verify (a trained router clusters neighbouring tokens).
- one KDA layer: q/k/v projections, short conv, the gates, the delta-rule recurrence
  over the W tokens (a Triton kernel below with its torch twin; one program per
  request, head and V-tile keeps the fp32 state tile in registers), output gate, o_proj.
- one MLA layer, absorbed (NoPE, latent 512 + rope 64, 32 heads) over a latent KV cache
  of ``--context`` tokens per request: plain torch matmul attention, not FlashMLA (an
  upper bound on the attention part).

On CUDA every case is captured in a CUDA graph and the replay is timed (as SGLang runs
decode and verify); a case whose capture fails is timed eagerly and its row says so.
Writes OUT/verify_cost.json (rows of layer, B, W, tokens, ms), which
``sglang-dflash plan --cost OUT/verify_cost.json`` reads in place of its model. Needs
only torch and triton. ``--shapes tiny`` runs small shapes (CPU tests).

    python benchmarks/verify_cost.py --out out/verify_cost              # GPU
    python benchmarks/verify_cost.py --shapes tiny --batch 1,2 --widths 1,3 --out out/verify_cost_tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@dataclass(frozen=True)
class Shapes:
    hidden: int
    experts: int
    top_k: int
    moe_inter: int
    kda_heads: int
    kda_dim: int
    conv: int
    mla_heads: int
    latent: int
    rope: int
    nope: int
    v_dim: int
    routed_scale: float = 2.446


SHAPES = {
    "kimi": Shapes(hidden=2304, experts=256, top_k=8, moe_inter=1024, kda_heads=32, kda_dim=128, conv=4,
                   mla_heads=32, latent=512, rope=64, nope=128, v_dim=128),
    "tiny": Shapes(hidden=64, experts=8, top_k=2, moe_inter=32, kda_heads=2, kda_dim=16, conv=4,
                   mla_heads=2, latent=16, rope=16, nope=16, v_dim=16),
}


def _w(*shape, device, dtype, scale=None):
    return (torch.randn(*shape, device=device) * (scale or shape[-2] ** -0.5)).to(dtype)


# ---- MoE ----


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, mode: str) -> torch.Tensor:
    """[M, N]: rows offs[e-1]..offs[e] of a [M, K] times b[e] [K, N], experts in order."""
    if mode == "grouped":
        return torch._grouped_mm(a, b, offs=offs)
    out = a.new_empty((a.shape[0], b.shape[2]))
    ends = offs.tolist()  # a host copy: the per-expert loop needs the row counts
    for e, (lo, hi) in enumerate(zip([0] + ends[:-1], ends)):
        if hi > lo:
            out[lo:hi] = a[lo:hi] @ b[e]
    return out


class MoELayer:
    def __init__(self, s: Shapes, device, dtype, mode: str):
        H, E, I = s.hidden, s.experts, s.moe_inter
        self.s, self.mode = s, mode
        self.router = _w(E, H, device=device, dtype=torch.float32, scale=H ** -0.5)
        self.bias = torch.randn(E, device=device) * 0.01
        self.w13 = _w(E, H, 2 * I, device=device, dtype=dtype)   # gate | up
        self.w2 = _w(E, I, H, device=device, dtype=dtype)
        self.shared13 = _w(H, 2 * I, device=device, dtype=dtype)
        self.shared2 = _w(I, H, device=device, dtype=dtype)
        self.touched = []  # experts each call routed to (for the routing figure)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [T, k], weights [T, k]: sigmoid scores, top-k by score + bias, renormalised."""
        scores = torch.sigmoid(x.float() @ self.router.T)
        ids = torch.topk(scores + self.bias, self.s.top_k, dim=-1).indices
        w = scores.gather(1, ids)
        return ids, (w / w.sum(-1, keepdim=True) * self.s.routed_scale).to(x.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, H]
        k, E = self.s.top_k, self.s.experts
        ids, w = self.route(x)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k
        # scatter_add instead of bincount: no host sync, so the call can be graph-captured
        counts = torch.zeros(E, device=x.device, dtype=torch.int32).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        self.last_counts = counts
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = grouped_gemm(x[token], self.w13, offs, self.mode)
        h = F.silu(h[:, : self.s.moe_inter]) * h[:, self.s.moe_inter:]
        y = grouped_gemm(h.contiguous(), self.w2, offs, self.mode) * w.reshape(-1)[order, None]
        out = torch.zeros_like(x).index_add_(0, token, y)
        s = x @ self.shared13
        return out + (F.silu(s[:, : self.s.moe_inter]) * s[:, self.s.moe_inter:]) @ self.shared2


# ---- KDA ----


@triton.jit
def _kda_verify_kernel(
    state,  # [B, H, K, V] fp32, updated in place
    q, k,   # [B, T, H, K] fp32 (l2-normalised)
    v,      # [B, T, H, V] fp32
    g,      # [B, T, H, K] fp32 log-decay
    beta,   # [B, T, H] fp32
    o,      # [B, T, H, V] fp32 out
    T, H, K, V, scale,
    BK: tl.constexpr, BV: tl.constexpr,
):
    i_b, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    p_s = state + ((i_b.to(tl.int64) * H + i_h) * K + o_k[:, None]) * V + o_v[None, :]
    b_s = tl.load(p_s, mask=m_k[:, None] & m_v[None, :], other=0.0)
    for t in range(0, T):
        i_row = (i_b.to(tl.int64) * T + tl.cast(t, tl.int64)) * H + i_h
        b_q = tl.load(q + i_row * K + o_k, mask=m_k, other=0.0)
        b_k = tl.load(k + i_row * K + o_k, mask=m_k, other=0.0)
        b_v = tl.load(v + i_row * V + o_v, mask=m_v, other=0.0)
        b_g = tl.load(g + i_row * K + o_k, mask=m_k, other=0.0)
        b_beta = tl.load(beta + i_row)
        b_s = b_s * tl.exp(b_g)[:, None]
        b_u = b_v - tl.sum(b_k[:, None] * b_s, axis=0)
        b_s = b_s + (b_beta * b_k)[:, None] * b_u[None, :]
        tl.store(o + i_row * V + o_v, tl.sum((b_q * scale)[:, None] * b_s, axis=0), mask=m_v)
    tl.store(p_s, b_s, mask=m_k[:, None] & m_v[None, :])


def kda_verify_recurrence(state, q, k, v, g, beta, use_triton: bool) -> torch.Tensor:
    """o [B, T, H, V]: the delta rule over T tokens from state [B, H, K, V] (updated)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5
    if use_triton:
        o = torch.empty_like(v)
        BV = min(triton.next_power_of_2(V), 32)
        _kda_verify_kernel[(B, H, triton.cdiv(V, BV))](
            state, q, k, v, g, beta, o, T, H, K, V, scale, BK=triton.next_power_of_2(K), BV=BV)
        return o
    outs = []
    for t in range(T):  # the twin: state [B, H, K, V]
        state.mul_(g[:, t].exp()[..., None])
        u = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], state)
        state.add_(torch.einsum("bhk,bhv->bhkv", beta[:, t, :, None] * k[:, t], u))
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
    return torch.stack(outs, dim=1)


class KDALayer:
    def __init__(self, s: Shapes, B: int, device, dtype, use_triton: bool):
        D, H, K = s.hidden, s.kda_heads, s.kda_dim
        self.s, self.use_triton = s, use_triton
        self.qkv = _w(D, 3 * H * K, device=device, dtype=dtype)
        self.conv_w = _w(3 * H * K, s.conv, device=device, dtype=dtype, scale=0.5)
        self.f_a, self.f_b = _w(D, K, device=device, dtype=dtype), _w(K, H * K, device=device, dtype=dtype)
        self.g_a, self.g_b = _w(D, K, device=device, dtype=dtype), _w(K, H * K, device=device, dtype=dtype)
        self.b = _w(D, H, device=device, dtype=dtype)
        self.o = _w(H * K, D, device=device, dtype=dtype)
        self.state = torch.zeros(B, H, K, K, device=device)
        self.conv_state = torch.zeros(B, s.conv - 1, 3 * H * K, device=device, dtype=dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [B, W, D]
        B, W, D = x.shape
        H, K = self.s.kda_heads, self.s.kda_dim
        seq = torch.cat([self.conv_state, x @ self.qkv], dim=1)  # [B, conv-1+W, 3HK]
        conv = sum(seq[:, i:i + W] * self.conv_w[:, i] for i in range(self.s.conv))
        self.conv_state.copy_(seq[:, W:])
        q, k, v = F.silu(conv).float().view(B, W, 3, H, K).unbind(2)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g = -F.softplus(((x @ self.f_a) @ self.f_b).float()).view(B, W, H, K)
        beta = torch.sigmoid((x @ self.b).float())
        o = kda_verify_recurrence(self.state, q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(),
                                  beta.contiguous(), self.use_triton)
        gate = torch.sigmoid((x @ self.g_a) @ self.g_b).view(B, W, H, K)
        o = F.rms_norm(o, (K,)).to(x.dtype) * gate
        return o.reshape(B, W, H * K) @ self.o


# ---- MLA ----


class MLALayer:
    def __init__(self, s: Shapes, B: int, context: int, W_max: int, device, dtype):
        D, Hh = s.hidden, s.mla_heads
        self.s, self.context = s, context
        self.q = _w(D, Hh * (s.nope + s.rope), device=device, dtype=dtype)
        self.kv_a = _w(D, s.latent + s.rope, device=device, dtype=dtype)
        self.w_uk = _w(Hh, s.nope, s.latent, device=device, dtype=dtype)
        self.w_uv = _w(Hh, s.latent, s.v_dim, device=device, dtype=dtype)
        self.o = _w(Hh * s.v_dim, D, device=device, dtype=dtype)
        self.cache = torch.randn(B, context + W_max, s.latent + s.rope, device=device).to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [B, W, D]
        s, (B, W, _), C = self.s, x.shape, self.context
        q = (x @ self.q).view(B, W, s.mla_heads, s.nope + s.rope)
        q_lat = torch.einsum("bwhn,hnl->bhwl", q[..., : s.nope], self.w_uk)
        q_full = torch.cat([q_lat, q[..., s.nope:].transpose(1, 2)], dim=-1)  # [B, h, W, latent+rope]
        self.cache[:, C:C + W] = F.rms_norm(x @ self.kv_a, (s.latent + s.rope,))
        kv = self.cache[:, : C + W]  # [B, C+W, latent+rope]
        scores = q_full @ kv[:, None].transpose(-1, -2) * (s.nope + s.rope) ** -0.5  # [B, h, W, C+W]
        # block token i sees the context and block tokens 0..i
        visible = torch.arange(C + W, device=x.device)[None, :] <= C + torch.arange(W, device=x.device)[:, None]
        p = torch.softmax(scores.float().masked_fill(~visible, float("-inf")), dim=-1).to(x.dtype)
        o_lat = p @ kv[:, None, :, : s.latent]  # [B, h, W, latent]
        o = torch.einsum("bhwl,hlv->bwhv", o_lat, self.w_uv)
        return o.reshape(B, W, -1) @ self.o


# ---- timing ----


def time_ms(fn, device: torch.device, reps: int) -> tuple[float, str]:
    """(ms per call, mode): CUDA-graph replay on CUDA when capture works, else eager."""
    if device.type != "cuda":
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t0) / reps, "eager (cpu)"
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run, mode = graph.replay, "cuda-graph"
    except Exception as e:  # recorded in the row, not hidden
        torch.cuda.synchronize()
        run, mode = fn, f"eager (graph capture failed: {type(e).__name__}: {str(e)[:120]})"
    return triton.testing.do_bench(run, warmup=10, rep=reps, return_mode="median"), mode


def measure(args, device, dtype) -> list[dict]:
    s, rows = SHAPES[args.shapes], []
    W_max = max(args.widths)
    moe = MoELayer(s, device, dtype, args.expert_gemm)
    for B in args.batch:
        kda = KDALayer(s, B, device, dtype, args.kda_kernel == "triton")
        mla = MLALayer(s, B, args.context, W_max, device, dtype)
        for W in args.widths:
            x = torch.randn(B, W, s.hidden, device=device).to(dtype)
            for name, fn in (("moe", lambda: moe(x.view(B * W, -1))), ("kda", lambda: kda(x)),
                             ("mla", lambda: mla(x))):
                ms, mode = time_ms(fn, device, args.reps)
                row = {"layer": name, "B": B, "W": W, "tokens": B * W, "ms": ms, "mode": mode}
                if name == "moe":
                    row["experts_touched"] = int((moe.last_counts > 0).sum())
                rows.append(row)
                print(f"{name:>4} B={B:<3} W={W:<3} {ms:9.4f} ms  {mode}", flush=True)
    return rows


def check_moe_modes(device, dtype, shapes: Shapes) -> float:
    """Max abs difference of the grouped GEMM against the per-expert loop (same routing),
    relative to the largest output."""
    x = torch.randn(12, shapes.hidden, device=device).to(dtype)
    a = MoELayer(shapes, device, dtype, "grouped")
    b = copy.copy(a)  # the same weights
    b.mode = "loop"
    grouped, loop = a(x).float(), b(x).float()
    return float((grouped - loop).abs().max() / loop.abs().max().clamp_min(1e-30))


# grouped vs per-expert loop: the same products summed in another order
MOE_MODES_TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shapes", choices=sorted(SHAPES), default="kimi")
    p.add_argument("--batch", type=_ints, default=[1, 8, 32, 64])
    p.add_argument("--widths", type=_ints, default=list(range(1, 17)), help="W = 1 is the decode step")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--expert-gemm", choices=("grouped", "loop"), default="grouped")
    p.add_argument("--kda-kernel", choices=("triton", "torch"), default=None,
                   help="default: triton on CUDA, the torch twin elsewhere")
    p.add_argument("--reps", type=int, default=None, help="timed calls (CUDA: ms of do_bench)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.kda_kernel = args.kda_kernel or ("triton" if device.type == "cuda" else "torch")
    args.reps = args.reps or (100 if device.type == "cuda" else 3)
    torch.manual_seed(0)
    check = check_moe_modes(device, dtype, SHAPES[args.shapes])
    rows = measure(args, device, dtype)
    result = {
        "tool": "benchmarks/verify_cost.py", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype),
        "shapes": {"name": args.shapes, **asdict(SHAPES[args.shapes])}, "context": args.context,
        "expert_gemm": "torch._grouped_mm" if args.expert_gemm == "grouped" else "per-expert matmul loop",
        "grouped_vs_loop_max_rel_diff": check, "kda_recurrence": args.kda_kernel,
        "routing": "random router weights: close to independent routing, the pessimistic case",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "verify_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out / 'verify_cost.json'} (plan --cost reads it)")
    if check > MOE_MODES_TOLERANCE[dtype]:
        print(f"verify_cost: FAILED: the grouped expert GEMM differs from the per-expert loop by "
              f"{check:.2e} of the output (allowed {MOE_MODES_TOLERANCE[dtype]:.0e})")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
