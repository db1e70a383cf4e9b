"""Draft attention: block queries over paged context K/V plus the block's own K/V (Triton).

One program per (request, KV head, split) holds the ``L * G`` query rows that share a KV
head (``G = Hq / Hkv``; row ``r`` is block position ``r // G``, query head
``h * G + r % G``), gathers the context keys of its split by slot, and runs an online
softmax in fp32. Split 0 also takes the ``L`` block keys, so every row has at least one
key. With one split the program writes the output; with several (long contexts on a GPU
with idle SMs) each writes a normalised partial output and its log2-sum-exp, and a merge
kernel combines them.

Same result as the twin ``sglang_dflash.kernels.naive.draft_attention`` up to fp32
summation order (fp32 inputs use IEEE dots; other dtypes are loaded to fp32 and use TF32
dots on a GPU).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .naive.draft_attention import check_draft_attention_args

_LOG2E = 1.4426950408889634


@triton.jit
def _online_update(b_q, p_k, p_v, m_n, m_d, b_m, b_l, b_acc, qk_scale, PRECISION: tl.constexpr):
    """Fold one tile of keys/values into the running softmax; m_n [BN] marks real keys."""
    m_kv = m_n[:, None] & m_d[None, :]
    b_k = tl.load(p_k, mask=m_kv, other=0.0).to(tl.float32)  # [BN, BD]
    b_v = tl.load(p_v, mask=m_kv, other=0.0).to(tl.float32)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # [BM, BN]
    b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    alpha = tl.exp2(b_m - b_m_new)
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_l = b_l * alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * alpha[:, None] + tl.dot(b_p, b_v, input_precision=PRECISION)
    return b_m_new, b_l, b_acc


@triton.jit
def _draft_attention_kernel(
    q,            # [B, L, Hq, D]
    k_pool,       # [N, Hkv, D]
    v_pool,       # [N, Hkv, D] (strides of k_pool)
    slot_table,   # [B, S]
    ctx_lens,     # [B]
    block_k,      # [B, L, Hkv, D]
    block_v,      # [B, L, Hkv, D] (strides of block_k)
    o,            # [B, L, Hq, D] when not SPLIT
    o_part,       # [B * Hkv, SPLITS, M, D] fp32 when SPLIT
    lse_part,     # [B * Hkv, SPLITS, M] fp32 when SPLIT
    s_qb, s_ql, s_qh, s_kn, s_kh, s_tb, s_bb, s_bl, s_bh, s_ob, s_ol, s_oh,
    Hkv, L, D, chunk, qk_scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // Hkv, i_bh % Hkv
    M = L * G
    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < M, o_d < D
    # row r: block position r // G, query head i_h * G + r % G
    row_q = (o_m // G) * s_ql + (i_h * G + o_m % G) * s_qh
    b_q = tl.load(q + i_b * s_qb + row_q[:, None] + o_d[None, :],
                  mask=m_m[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BM, BD]
    # running max starts finite, so exp2(m_old - m_new) never sees (-inf) - (-inf)
    b_m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if i_s == 0:
        o_j = tl.arange(0, BLOCK_L)
        off_j = i_b * s_bb + o_j[:, None] * s_bl + i_h * s_bh + o_d[None, :]
        b_m, b_l, b_acc = _online_update(b_q, block_k + off_j, block_v + off_j, o_j < L, m_d,
                                         b_m, b_l, b_acc, qk_scale, PRECISION)

    ctx_len = tl.load(ctx_lens + i_b)
    start = i_s * chunk
    end = tl.minimum(start + chunk, ctx_len)
    for n0 in range(start, end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        i_slot = tl.load(slot_table + i_b * s_tb + o_n, mask=m_n, other=0).to(tl.int64)  # [BN]
        p_n = i_slot[:, None] * s_kn + i_h * s_kh + o_d[None, :]
        b_m, b_l, b_acc = _online_update(b_q, k_pool + p_n, v_pool + p_n, m_n, m_d,
                                         b_m, b_l, b_acc, qk_scale, PRECISION)

    m_out = m_m[:, None] & m_d[None, :]
    if SPLIT:
        # a split with no keys (past this request's context) reports weight 0 to the merge
        seen = b_l > 0
        b_l = tl.where(seen, b_l, 1.0)
        b_out = b_acc / b_l[:, None]
        row_part = ((i_bh * tl.num_programs(1) + i_s) * M + o_m).to(tl.int64)
        tl.store(o_part + row_part[:, None] * D + o_d[None, :], b_out, mask=m_out)
        tl.store(lse_part + row_part, tl.where(seen, b_m + tl.log2(b_l), float("-inf")), mask=m_m)
    else:
        b_out = b_acc / b_l[:, None]
        row_o = (o_m // G) * s_ol + (i_h * G + o_m % G) * s_oh
        tl.store(o + i_b * s_ob + row_o[:, None] + o_d[None, :],
                 b_out.to(o.dtype.element_ty), mask=m_out)


@triton.jit
def _merge_splits_kernel(
    o_part,    # [B * Hkv, SPLITS, M, D] fp32
    lse_part,  # [B * Hkv, SPLITS, M] fp32
    o,         # [B, L, Hq, D]
    s_ob, s_ol, s_oh,
    Hkv, L, D, SPLITS,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // Hkv, i_bh % Hkv
    M = L * G
    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < M, o_d < D
    b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for i_s in range(0, SPLITS):
        row = ((i_bh * SPLITS + i_s) * M + o_m).to(tl.int64)
        b_max = tl.maximum(b_max, tl.load(lse_part + row, mask=m_m, other=0.0))
    b_den = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i_s in range(0, SPLITS):
        row = ((i_bh * SPLITS + i_s) * M + o_m).to(tl.int64)
        # split 0 holds the block keys, so b_max is finite on every valid row
        b_w = tl.exp2(tl.load(lse_part + row, mask=m_m, other=0.0) - b_max)
        b_part = tl.load(o_part + row[:, None] * D + o_d[None, :],
                         mask=m_m[:, None] & m_d[None, :], other=0.0)
        b_acc += b_w[:, None] * b_part
        b_den += b_w
    b_out = b_acc / b_den[:, None]
    row_o = (o_m // G) * s_ol + (i_h * G + o_m % G) * s_oh
    tl.store(o + i_b * s_ob + row_o[:, None] + o_d[None, :], b_out.to(o.dtype.element_ty),
             mask=m_m[:, None] & m_d[None, :])


def _check_strides(q, k_pool, v_pool, slot_table, block_k, block_v) -> None:
    named = (("q", q), ("k_pool", k_pool), ("v_pool", v_pool), ("slot_table", slot_table),
             ("block_k", block_k), ("block_v", block_v))
    for name, t in named:
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"draft_attention: argument `{name}`: expected a contiguous last "
                             f"dim, got strides {t.stride()}")
    if k_pool.stride() != v_pool.stride():
        raise ValueError(f"draft_attention: arguments `k_pool`/`v_pool`: expected equal strides, "
                         f"got {k_pool.stride()} and {v_pool.stride()}")
    if block_k.stride() != block_v.stride():
        raise ValueError(f"draft_attention: arguments `block_k`/`block_v`: expected equal strides, "
                         f"got {block_k.stride()} and {block_v.stride()}")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(q: torch.Tensor, num_kv_heads: int, max_ctx: int) -> int:
    """Splits of the context so a small batch still fills a GPU (about two waves); 1 on CPU.

    Depends only on shapes, never on tensor values, so it needs no device sync."""
    if not q.is_cuda or max_ctx < 1024:
        return 1
    programs = q.shape[0] * num_kv_heads
    wanted = triton.cdiv(2 * _sm_count(q.device.index or 0), programs)
    return max(1, min(wanted, max_ctx // 512, 64))


def draft_attention_splits(
    q: torch.Tensor,           # [B, L, Hq, D]
    k_pool: torch.Tensor,      # [N, Hkv, D]
    v_pool: torch.Tensor,      # [N, Hkv, D]
    slot_table: torch.Tensor,  # [B, S] int32/int64
    ctx_lens: torch.Tensor,    # [B] int32/int64
    block_k: torch.Tensor,     # [B, L, Hkv, D]
    block_v: torch.Tensor,     # [B, L, Hkv, D]
    scale: float,
    num_splits: int,
    out: torch.Tensor | None,  # [B, L, Hq, D] contiguous, dtype of q; None: allocated here
) -> torch.Tensor:             # [B, L, Hq, D], dtype of q
    """``draft_attention`` with an explicit number of context splits and output buffer
    (tests poison the buffer; benchmarks pick the splits)."""
    check_draft_attention_args(q, k_pool, v_pool, slot_table, ctx_lens, block_k, block_v)
    _check_strides(q, k_pool, v_pool, slot_table, block_k, block_v)
    if num_splits < 1:
        raise ValueError(f"draft_attention: argument `num_splits`: expected >= 1, got {num_splits}")
    B, L, Hq, D = q.shape
    Hkv, S = k_pool.shape[1], slot_table.shape[1]
    G = Hq // Hkv
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or not out.is_contiguous()):
        raise ValueError(f"draft_attention: argument `out`: expected a contiguous {tuple(q.shape)} "
                         f"{q.dtype} tensor on {q.device}, got {tuple(out.shape)} {out.dtype}")
    o = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if o.numel() == 0:
        return o
    BLOCK_M = max(16, triton.next_power_of_2(L * G))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N = 64 if BLOCK_D <= 64 else 32
    chunk = triton.cdiv(triton.cdiv(max(S, 1), num_splits), BLOCK_N) * BLOCK_N
    split = num_splits > 1
    o_part = q.new_empty((B * Hkv, num_splits, L * G, D) if split else (1,), dtype=torch.float32)
    lse_part = q.new_empty((B * Hkv, num_splits, L * G) if split else (1,), dtype=torch.float32)
    num_warps = 4 if BLOCK_M * BLOCK_D <= 4096 else 8
    _draft_attention_kernel[(B * Hkv, num_splits)](
        q, k_pool, v_pool, slot_table, ctx_lens, block_k, block_v, o, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2), k_pool.stride(0), k_pool.stride(1),
        slot_table.stride(0), block_k.stride(0), block_k.stride(1), block_k.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        Hkv, L, D, chunk, scale * _LOG2E,
        G=G, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_L=max(16, triton.next_power_of_2(L)),
        BLOCK_D=BLOCK_D, SPLIT=split, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    if split:
        _merge_splits_kernel[(B * Hkv,)](
            o_part, lse_part, o, o.stride(0), o.stride(1), o.stride(2), Hkv, L, D, num_splits,
            G=G, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=num_warps,
        )
    return o


def draft_attention(
    q: torch.Tensor,           # [B, L, Hq, D] block queries (after q_norm + RoPE)
    k_pool: torch.Tensor,      # [N, Hkv, D] context keys of one draft layer
    v_pool: torch.Tensor,      # [N, Hkv, D]
    slot_table: torch.Tensor,  # [B, S] int32/int64: slot of context position t at column t
    ctx_lens: torch.Tensor,    # [B] int32/int64, 0..S
    block_k: torch.Tensor,     # [B, L, Hkv, D]
    block_v: torch.Tensor,     # [B, L, Hkv, D]
    scale: float,
) -> torch.Tensor:             # [B, L, Hq, D], dtype of q
    if not math.isfinite(scale):
        raise ValueError(f"draft_attention: argument `scale`: expected a finite number, got {scale}")
    splits = default_num_splits(q, max(k_pool.shape[1], 1), slot_table.shape[-1])
    return draft_attention_splits(q, k_pool, v_pool, slot_table, ctx_lens, block_k, block_v,
                                  scale, splits, None)
