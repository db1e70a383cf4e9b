"""Acceptance of a verified block (Triton): one small kernel per rule, one program per request.

Both kernels build the step's token chain in registers (``L`` is 16), then share
``_finish_block`` for the stop conditions. The sampled kernel gathers ``p(draft)`` for
every draft position, finds the first rejection ``a``, and samples row ``a`` of ``probs``
in two passes over the vocabulary tiles: the fixed-point mass (total, and the removed
draft's share), then the inverse CDF as a running integer cumsum.

Bit-exact with the twins in ``sglang_dflash.kernels.naive.accept``: the greedy rule is
integer logic, the sampled one compares fp32 values exactly as the twin does and sums
fixed-point integers, whose result does not depend on the order of the tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive.accept import CDF_SCALE, check_accept_greedy_args, check_accept_sampled_args


@triton.jit
def _finish_block(
    b_tok,      # [BLOCK_L] int64 chain; entries at or past n are ignored
    n,          # chain length before stop conditions (a + 1)
    i_b,
    remaining,  # [B]
    stop_ids,   # [B, E]
    emitted,    # [B, L]
    accept_len,  # [B]
    finished,   # [B] bool
    s_sb, s_eb, L, E,
    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
):
    o_l = tl.arange(0, BLOCK_L)
    o_e = tl.arange(0, BLOCK_E)
    b_stop = tl.load(stop_ids + i_b * s_sb + o_e, mask=o_e < E, other=-1)  # [BLOCK_E]
    hits = (b_tok[:, None] == b_stop[None, :]) & (b_stop[None, :] >= 0)
    is_stop = (tl.max(hits.to(tl.int32), axis=1) > 0) & (o_l < n)
    first_stop = tl.min(tl.where(is_stop, o_l, BLOCK_L), axis=0)
    b_rem = tl.load(remaining + i_b)
    commit = tl.minimum(tl.minimum(n, first_stop + 1).to(tl.int64), b_rem)
    done = (first_stop < commit) | (commit == b_rem)
    tl.store(emitted + i_b * s_eb + o_l, tl.where(o_l < commit, b_tok, -1), mask=o_l < L)
    tl.store(accept_len + i_b, commit - 1)
    tl.store(finished + i_b, done)


@triton.jit
def _accept_greedy_kernel(
    candidates,      # [B, L] int64
    target_predict,  # [B, L] int64
    remaining,       # [B] int64
    stop_ids,        # [B, E] int64
    accept_len,      # [B] int64
    emitted,         # [B, L] int64 contiguous
    finished,        # [B] bool
    s_cb, s_tb, s_sb, L, E,
    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_l = tl.arange(0, BLOCK_L)
    # draft j+1 against the target's token j; the last column has no draft to check
    m_draft = o_l < L - 1
    b_draft = tl.load(candidates + i_b * s_cb + o_l + 1, mask=m_draft, other=0)
    b_pred = tl.load(target_predict + i_b * s_tb + o_l, mask=o_l < L, other=0)
    rejected = m_draft & (b_draft != b_pred)
    a = tl.min(tl.where(rejected, o_l, L - 1), axis=0)
    _finish_block(b_pred, a + 1, i_b, remaining, stop_ids, emitted, accept_len, finished,
                  s_sb, L, L, E, BLOCK_L, BLOCK_E)


@triton.jit
def _accept_sampled_kernel(
    candidates,  # [B, L] int64
    probs,       # [B, L, V] fp32, unit stride on V
    u_accept,    # [B, L] fp32
    u_sample,    # [B] fp32
    remaining,   # [B] int64
    stop_ids,    # [B, E] int64
    accept_len,  # [B] int64
    emitted,     # [B, L] int64 contiguous
    finished,    # [B] bool
    s_cb, s_pb, s_pl, s_ub, s_sb, L, E, V, cdf_scale,
    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_l = tl.arange(0, BLOCK_L)
    m_draft = o_l < L - 1
    b_draft = tl.load(candidates + i_b * s_cb + o_l + 1, mask=m_draft, other=0)  # [BLOCK_L]
    p_row = probs + i_b * s_pb
    # an out-of-vocabulary draft (invalid input, checked on CPU only) reads p = 0
    m_read = m_draft & (b_draft >= 0) & (b_draft < V)
    b_pd = tl.load(p_row + o_l * s_pl + b_draft, mask=m_read, other=0.0)
    b_u = tl.load(u_accept + i_b * s_ub + o_l, mask=m_draft, other=1.0)
    # accept iff u < p(draft), written so that a NaN probability rejects as in the twin
    rejected = m_draft & ((b_u < b_pd) == 0)
    a = tl.min(tl.where(rejected, o_l, L - 1), axis=0)
    # the draft rejected at a loses its mass in the residual; -1 when all were accepted
    removed = tl.sum(tl.where(o_l == a, b_draft, 0), axis=0)
    removed = tl.where(a < L - 1, removed, -1)

    p_sample = p_row + a * s_pl
    o_v = tl.arange(0, BLOCK_V)
    total_all = tl.zeros([], dtype=tl.int64)
    q_removed = tl.zeros([], dtype=tl.int64)
    for v0 in range(0, V, BLOCK_V):
        b_q = (tl.load(p_sample + v0 + o_v, mask=v0 + o_v < V, other=0.0) * cdf_scale).to(tl.int64)
        total_all += tl.sum(b_q, axis=0)
        q_removed += tl.sum(tl.where(v0 + o_v == removed, b_q, 0), axis=0)
    # a rejected draft holding all the mass leaves nothing to renormalise: keep it
    keep_all = total_all == q_removed
    removed = tl.where(keep_all, -1, removed)
    total = tl.where(keep_all, total_all, total_all - q_removed)
    b_us = tl.load(u_sample + i_b)
    t = (b_us.to(tl.float64) * total.to(tl.float64)).to(tl.int64)
    # token = number of prefix sums <= t, i.e. the first index whose prefix sum passes t
    count = tl.zeros([], dtype=tl.int64)
    carry = tl.zeros([], dtype=tl.int64)
    for v0 in range(0, V, BLOCK_V):
        b_q = (tl.load(p_sample + v0 + o_v, mask=v0 + o_v < V, other=0.0) * cdf_scale).to(tl.int64)
        b_q = tl.where(v0 + o_v == removed, 0, b_q)
        b_cdf = carry + tl.cumsum(b_q, axis=0)
        count += tl.sum(((b_cdf <= t) & (v0 + o_v < V)).to(tl.int64), axis=0)
        carry += tl.sum(b_q, axis=0)
    token = tl.minimum(count, V - 1)

    # E.g. L=4, a=1: candidates [c, d1, d2, d3] -> chain [d1, token, ., .]
    b_tok = tl.where(o_l == a, token, b_draft)
    _finish_block(b_tok, a + 1, i_b, remaining, stop_ids, emitted, accept_len, finished,
                  s_sb, L, L, E, BLOCK_L, BLOCK_E)


def _check_strides(op: str, named) -> None:
    for name, t in named:
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{op}: argument `{name}`: expected a contiguous last dim, "
                             f"got strides {tuple(t.stride())}")


def _outputs(candidates: torch.Tensor):
    B, L = candidates.shape
    accept_len = torch.empty(B, dtype=torch.int64, device=candidates.device)
    emitted = torch.empty(B, L, dtype=torch.int64, device=candidates.device)
    finished = torch.empty(B, dtype=torch.bool, device=candidates.device)
    return accept_len, emitted, finished


def _block_sizes(candidates: torch.Tensor, stop_ids: torch.Tensor) -> dict:
    return dict(BLOCK_L=max(16, triton.next_power_of_2(candidates.shape[1])),
                BLOCK_E=max(1, triton.next_power_of_2(stop_ids.shape[1])))


def accept_greedy(
    candidates: torch.Tensor,      # [B, L] int64; col 0 = last committed token, cols 1.. = drafts
    target_predict: torch.Tensor,  # [B, L] int64 target argmax for the position after each candidate
    remaining: torch.Tensor,       # [B] int64 >= 1: tokens the request may still emit
    stop_ids: torch.Tensor,        # [B, E] int64 stop ids per request, -1 = unused (E may be 0)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # accept_len [B], emitted [B, L], finished [B] bool
    check_accept_greedy_args(candidates, target_predict, remaining, stop_ids)
    _check_strides("accept_greedy", (("candidates", candidates), ("target_predict", target_predict),
                                     ("remaining", remaining), ("stop_ids", stop_ids)))
    accept_len, emitted, finished = _outputs(candidates)
    B, L = candidates.shape
    if B == 0:
        return accept_len, emitted, finished
    _accept_greedy_kernel[(B,)](
        candidates, target_predict, remaining, stop_ids, accept_len, emitted, finished,
        candidates.stride(0), target_predict.stride(0), stop_ids.stride(0), L, stop_ids.shape[1],
        **_block_sizes(candidates, stop_ids), num_warps=1,
    )
    return accept_len, emitted, finished


def accept_sampled(
    candidates: torch.Tensor,  # [B, L] int64 (greedy drafts in cols 1..)
    probs: torch.Tensor,       # [B, L, V] fp32 target distribution for the position after each candidate
    u_accept: torch.Tensor,    # [B, L] fp32 uniforms in [0, 1); u_accept[b, j] decides draft j+1
    u_sample: torch.Tensor,    # [B] fp32 uniform in [0, 1) for the residual / bonus sample
    remaining: torch.Tensor,   # [B] int64 >= 1
    stop_ids: torch.Tensor,    # [B, E] int64, -1 = unused
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # accept_len [B], emitted [B, L], finished [B] bool
    check_accept_sampled_args(candidates, probs, u_accept, u_sample, remaining, stop_ids)
    _check_strides("accept_sampled", (("candidates", candidates), ("probs", probs),
                                      ("u_accept", u_accept), ("u_sample", u_sample),
                                      ("remaining", remaining), ("stop_ids", stop_ids)))
    accept_len, emitted, finished = _outputs(candidates)
    B, L = candidates.shape
    if B == 0:
        return accept_len, emitted, finished
    V = probs.shape[2]
    _accept_sampled_kernel[(B,)](
        candidates, probs, u_accept, u_sample, remaining, stop_ids, accept_len, emitted, finished,
        candidates.stride(0), probs.stride(0), probs.stride(1), u_accept.stride(0),
        stop_ids.stride(0), L, stop_ids.shape[1], V, CDF_SCALE,
        BLOCK_V=min(4096, triton.next_power_of_2(V)), **_block_sizes(candidates, stop_ids),
        num_warps=4,
    )
    return accept_len, emitted, finished
