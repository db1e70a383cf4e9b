"""Step-time model of a MoE target under DFlash: a verify of W positions vs a plain step.

A MODEL, not a measurement: every figure it gives is an estimate until
``benchmarks/verify_cost.py`` has timed the layers on the GPU (``plan --cost``).

Derivation. A decode or verify step of B requests, each with W tokens (W = 1: plain
decoding), is memory-bound on these GPUs unless its FLOPs say otherwise, so per step

    t_target(B, W) = max(bytes / (HBM x eff(T)), flops / (peak x flop_eff)) + t_comm,
    T = B x W tokens.

bytes. The weights each token reads: the dense part (attention, shared expert, dense
layer 0, lm_head: ``active_params - moe_layers x top_k x expert_params``) once per step,
and in each MoE layer every expert that *some* token of the step routes to. With top-k
of E experts and n independently routed tokens, an expert is missed by all of them with
probability (1 - k/E)^n, so the experts read per layer are

    E_touched(n) = E x (1 - (1 - k/E)^n).

Tokens of one request's verify block are not independent (neighbouring tokens share
experts); the routing locality rho in [0, 1] says how much: a request's W tokens route
like n_req = 1 + (W - 1)(1 - rho) independent ones (rho = 0: independent, what random
router weights give and the pessimistic case; rho = 0.46 gives ~64 of 256 experts for 16
tokens, the "clustered" case). Requests are independent of each other: n = B x n_req.
Plus per request the MLA latent KV of its context (read, replicated on every TP rank)
and the KDA recurrent + conv state (read and written; split over TP ranks).

flops = 2 x T x active_params + the MLA attention over the context (absorbed: per token,
layer, head and context key 2 x (latent + rope) + 2 x latent).

eff(T): the fraction of HBM bandwidth a step reaches; 0.5 for one token, 0.7 from 16
tokens on (GPU_READINESS.md's assumption), linear in log2 T between. t_comm: two
all-reduces per layer at TP > 1, each ``allreduce_us``.

The draft (the drafter's L-block forward plus the greedy head over the W - 1 verified
drafts) is a sum of three rooflines: drafter weights vs its FLOPs (B x L tokens), the
lm_head (vocab-parallel under TP) vs 2 x B x (W - 1) x its params, the draft K/V of the
context vs the attention FLOPs. An eager drafter is bounded below by its kernel launches
(``launches x launch_us``); a graphed one is not.

Speculation emits tau(W) tokens per request per step, tau(W) = 1 + sum_{j<W} p_j with p_j
= P(draft j accepted) of the trained block (drafting L and verifying W accepts exactly the
first min(accepted, W - 1) drafts). Hence, per concurrency C (B = C requests running):

    speed-up(W) = tau(W) x t_target(C, 1) / (t_target(C, W) + t_draft(C, W)),
    break-even tau(W) = (t_target(C, W) + t_draft(C, W)) / t_target(C, 1).

Not modelled: the scheduler's host time per step (the same with and without
speculation, so it pulls speed-ups towards 1), prefill, the KDA verify record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class GPU:
    name: str
    hbm_gbps: float     # achievable HBM bandwidth (about 90 % of the data sheet's)
    bf16_tflops: float  # dense bf16 tensor-core peak


# H200 4.3 of 4.8 TB/s, as GPU_READINESS.md's model; the others scaled the same way
GPUS = {
    "h200": GPU("H200", 4300.0, 989.0),
    "h100": GPU("H100 SXM", 3000.0, 989.0),
    "b200": GPU("B200", 7200.0, 2250.0),
}


@dataclass(frozen=True)
class Target:
    """Kimi-Linear-48B-A3B (config.json and DESIGN.md section 2), bf16 weights."""

    active_params: float = 3.08e9     # per token: dense part + shared + top-k routed experts
    moe_layers: int = 26              # layer 0 is dense
    experts: int = 256
    top_k: int = 8
    expert_params: float = 3 * 2304 * 1024   # gate, up, down = 7.08M
    mla_layers: int = 7
    kda_layers: int = 20
    mla_heads: int = 32
    mla_latent: int = 512             # kv_lora_rank
    mla_rope: int = 64
    kda_state_bytes: float = 41.4 * MIB     # per request: 20 x 2 MiB fp32 state + conv windows
    hidden: int = 2304
    weight_bytes: int = 2
    # what verify_cost.py's MoE / KDA / MLA layers leave out: lm_head and layer 0's dense MLP
    untimed_params: float = 163840 * 2304 + 3 * 2304 * 9216

    @property
    def mla_kv_bytes_per_token(self) -> int:
        return self.mla_layers * (self.mla_latent + self.mla_rope) * 2  # bf16 latent + rope: 8064

    @property
    def dense_params(self) -> float:
        """Weights every token reads: all but the routed experts."""
        return self.active_params - self.moe_layers * self.top_k * self.expert_params

    @property
    def layers(self) -> int:
        return self.mla_layers + self.kda_layers


@dataclass(frozen=True)
class Drafter:
    """The published Kimi-Linear drafter's geometry as CPU_SERVING.md infers it (902 MB)."""

    params: float = 451.2e6           # 5 layers of hidden 2304, intermediate 9216, fc 5 x 2304 -> 2304
    layers: int = 5
    heads: int = 32
    head_dim: int = 72
    kv_bytes_per_token: int = 5 * 2 * 32 * 72 * 2   # 46080 B bf16
    lm_head_params: float = 163840 * 2304           # the target's, borrowed
    block_size: int = 16
    launches: int = 350               # kernel launches of one eager draft step


@dataclass(frozen=True)
class Assumptions:
    context: int = 2048               # tokens of context per request
    routing_locality: float = 0.0     # rho, see the module docstring
    eff_one_token: float = 0.5        # HBM efficiency of a 1-token step
    eff_16_tokens: float = 0.7        # ... of a step of 16 tokens or more
    flop_eff: float = 0.5             # fraction of the bf16 peak a MoE/attention GEMM reaches
    drafter_graphed: bool = True      # CUDA-graphed draft (no launch floor)
    launch_us: float = 5.0            # per kernel launch of an eager draft
    allreduce_us: float = 10.0        # per all-reduce at TP > 1 (two per layer)

    def __post_init__(self):
        if not 0.0 <= self.routing_locality <= 1.0:
            raise ValueError(f"routing_locality must lie in [0, 1], got {self.routing_locality}")


def experts_touched(tokens: float, experts: int, top_k: int) -> float:
    """Expected distinct experts that `tokens` independently routed tokens read per layer."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def routed_tokens(B: int, W: int, locality: float) -> float:
    """Independent-token equivalent of B requests verifying W tokens each."""
    return B * (1.0 + (W - 1) * (1.0 - locality))


def hbm_efficiency(tokens: int, a: Assumptions) -> float:
    x = min(max(math.log2(max(tokens, 1)) / 4.0, 0.0), 1.0)  # 0 at 1 token, 1 at >= 16
    return a.eff_one_token + (a.eff_16_tokens - a.eff_one_token) * x


def target_step_ms(gpu: GPU, m: Target, a: Assumptions, B: int, W: int, tp: int = 1) -> float:
    """One target forward over B requests x W tokens (W = 1: a plain decode step), ms."""
    if B < 1 or W < 1 or tp < 1:
        raise ValueError(f"B, W and tp must be >= 1, got {B}, {W}, {tp}")
    T = B * W
    touched = experts_touched(routed_tokens(B, W, a.routing_locality), m.experts, m.top_k)
    weights = m.weight_bytes * (m.dense_params + m.moe_layers * touched * m.expert_params) / tp
    per_request = a.context * m.mla_kv_bytes_per_token + 2 * m.kda_state_bytes / tp
    bytes_ = weights + B * per_request
    attn = m.mla_layers * m.mla_heads / tp * a.context * (2 * (m.mla_latent + m.mla_rope) + 2 * m.mla_latent)
    flops = T * (2 * m.active_params / tp + attn)
    t_mem = bytes_ / (gpu.hbm_gbps * 1e9 * hbm_efficiency(T, a))
    t_flop = flops / (gpu.bf16_tflops * 1e12 * a.flop_eff)
    t_comm = 2 * m.layers * a.allreduce_us * 1e-6 if tp > 1 else 0.0
    return 1e3 * (max(t_mem, t_flop) + t_comm)


def draft_ms(gpu: GPU, d: Drafter, a: Assumptions, B: int, W: int, tp: int = 1) -> float:
    """One draft step: the L-block forward and the greedy head over W - 1 drafts, ms."""
    T = B * d.block_size
    bw = gpu.hbm_gbps * 1e9 * hbm_efficiency(T, a)
    fl = gpu.bf16_tflops * 1e12 * a.flop_eff
    body = max(2 * d.params / bw, 2 * T * d.params / fl)
    head = max(2 * d.lm_head_params / tp / bw, 2 * B * (W - 1) * d.lm_head_params / tp / fl)
    attn_flops = 4 * T * a.context * d.layers * d.heads * d.head_dim
    attn = max(B * a.context * d.kv_bytes_per_token / bw, attn_flops / fl)
    gpu_ms = 1e3 * (body + head + attn)
    if a.drafter_graphed:
        return gpu_ms
    return max(gpu_ms, d.launches * a.launch_us * 1e-3)


def tau_at(curve: list[float], W: int) -> float:
    """tau(W) = 1 + sum of P(draft j accepted) for j < W, from the trained block's curve."""
    if not 1 <= W <= len(curve) + 1:
        raise ValueError(f"verify width {W}: the acceptance curve covers W = 1..{len(curve) + 1}")
    return 1.0 + sum(curve[: W - 1])
