"""Draft attention: block queries over paged context K/V plus the block's own K/V (Triton).

One program per (request, KV head, split) holds the ``L * G`` query rows that share a KV
head (``G = Hq / Hkv``; row ``r`` is block position ``r // G``, query head
``h * G + r % G``), gathers the context keys of its split by slot, and runs an online
softmax in fp32. Request ``b``'s context is row ``slot_rows[b]`` of ``slot_table``
(SGLang's ``req_to_token`` itself, so the table never changes shape between steps), cut
on the device to ``min(ctx_lens[b], S)``: a length past the row is never read past it.
Split 0 also takes the ``L`` block keys, so every row has at least one key. The number of
splits depends only on shapes (batch, KV heads, table width, the GPU's SMs), and each
request's context is cut into that many chunks on the device, so a CUDA graph captured
for a batch bucket serves every context length. With one split the program writes the
output; with several each writes a normalised partial output and its log2-sum-exp, and a
merge kernel combines them.

bf16/fp16 tiles go straight into the tensor-core dots (fp32 accumulation; the softmax
weights are rounded to the value dtype for the second dot, as flash attention does);
fp32 inputs, and every input under the CPU interpreter (whose bf16 arithmetic is wrong),
are upcast and use IEEE fp32 dots. The context loop is software-pipelined
(``num_stages``): the next K/V tiles load while the current ones are used. K/V tiles enter
in ``_online_update`` only, which also dequantises an fp8 (e4m3) pool (``QUANT``): its
tiles are converted (exactly) to the dtype of ``q`` for the dots, the key scale of the
program's KV head multiplies the scores and the value scale the softmax weights
(``p @ (s * v) = (s * p) @ v``), so the per-element work is on the smaller tiles. The
block's own keys and values enter unscaled.

Same result as the twin ``sglang_dflash.kernels.naive.draft_attention`` up to fp32
summation order and, for bf16, the rounding of the softmax weights.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .jit_launches import meta_sm_count
from .naive.draft_attention import check_draft_attention_args
from .naive.draft_kv import FP8_DTYPE

_LOG2E = 1.4426950408889634


@triton.jit
def _online_update(b_q, p_k, p_v, m_n, m_d, b_m, b_l, b_acc, qk_scale, k_mul, v_mul, UPCAST: tl.constexpr):
    """Fold one tile of keys/values into the running softmax; m_n [BN] marks real keys.
    The tile's entries count as k_mul * key and v_mul * value (an fp8 pool's scales, or 1)."""
    m_kv = m_n[:, None] & m_d[None, :]
    b_k = tl.load(p_k, mask=m_kv, other=0.0)  # [BN, BD]
    b_v = tl.load(p_v, mask=m_kv, other=0.0)
    if UPCAST:
        b_s = tl.dot(b_q, tl.trans(b_k.to(tl.float32)), input_precision="ieee")
    else:
        b_s = tl.dot(b_q, tl.trans(b_k.to(b_q.dtype)))  # [BM, BN] fp32
    b_s = tl.where(m_n[None, :], b_s * (qk_scale * k_mul), float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    alpha = tl.exp2(b_m - b_m_new)
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_l = b_l * alpha + tl.sum(b_p, axis=1)
    if UPCAST:
        b_acc = tl.dot(b_p * v_mul, b_v.to(tl.float32), b_acc * alpha[:, None], input_precision="ieee")
    else:
        b_acc = tl.dot((b_p * v_mul).to(b_q.dtype), b_v.to(b_q.dtype), b_acc * alpha[:, None])
    return b_m_new, b_l, b_acc


@triton.jit
def _draft_attention_kernel(
    q,            # [B, L, Hq, D]
    k_pool,       # [N, Hkv, D]
    v_pool,       # [N, Hkv, D] (strides of k_pool)
    slot_table,   # [R, S]
    slot_rows,    # [B]
    ctx_lens,     # [B]
    block_k,      # [B, L, Hkv, D]
    block_v,      # [B, L, Hkv, D] (strides of block_k)
    k_scale,      # [Hkv] fp32 when QUANT
    v_scale,      # [Hkv] fp32 when QUANT
    o,            # [B, L, Hq, D] when not SPLIT
    o_part,       # [B * Hkv, SPLITS, M, D] fp32 when SPLIT
    lse_part,     # [B * Hkv, SPLITS, M] fp32 when SPLIT
    s_qb, s_ql, s_kn, s_tr, s_bb, s_bl, s_ob, s_ol,
    Hkv, L, S, qk_scale,
    D: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    QUANT: tl.constexpr,
):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // Hkv, i_bh % Hkv
    M = L * G
    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < M, o_d < D
    # row r: block position r // G, query head i_h * G + r % G (heads are D apart)
    row_q = (o_m // G) * s_ql + (i_h * G + o_m % G) * D
    b_q = tl.load(q + i_b * s_qb + row_q[:, None] + o_d[None, :], mask=m_m[:, None] & m_d[None, :],
                  other=0.0)  # [BM, BD]
    if UPCAST:
        b_q = b_q.to(tl.float32)
    # running max starts finite, so exp2(m_old - m_new) never sees (-inf) - (-inf)
    b_m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if i_s == 0:
        o_j = tl.arange(0, BLOCK_L)
        off_j = i_b * s_bb + o_j[:, None] * s_bl + i_h * D + o_d[None, :]
        b_m, b_l, b_acc = _online_update(b_q, block_k + off_j, block_v + off_j, o_j < L, m_d,
                                         b_m, b_l, b_acc, qk_scale, 1.0, 1.0, UPCAST)
    if QUANT:
        k_mul, v_mul = tl.load(k_scale + i_h), tl.load(v_scale + i_h)
    else:
        k_mul, v_mul = 1.0, 1.0

    # the device-side length never reaches past the table row
    ctx_len = tl.maximum(tl.minimum(tl.load(ctx_lens + i_b), S), 0)
    chunk = tl.cdiv(tl.cdiv(ctx_len, tl.num_programs(1)), BLOCK_N) * BLOCK_N
    start = i_s * chunk
    end = tl.minimum(start + chunk, ctx_len)
    p_row = slot_table + tl.load(slot_rows + i_b).to(tl.int64) * s_tr
    o_n = start + tl.arange(0, BLOCK_N)
    i_next = tl.load(p_row + o_n, mask=o_n < end, other=0)  # [BN]
    for n0 in range(start, end, BLOCK_N):
        # the next tile's slots load one tile ahead, so the K/V gather of a tile depends on
        # no load of its own iteration and the pipeliner can multi-buffer it
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        i_slot = i_next.to(tl.int64)
        i_next = tl.load(p_row + o_n + BLOCK_N, mask=o_n + BLOCK_N < end, other=0)
        p_n = i_slot[:, None] * s_kn + i_h * D + o_d[None, :]
        b_m, b_l, b_acc = _online_update(b_q, k_pool + p_n, v_pool + p_n, m_n, m_d,
                                         b_m, b_l, b_acc, qk_scale, k_mul, v_mul, UPCAST)

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
        row_o = (o_m // G) * s_ol + (i_h * G + o_m % G) * D
        tl.store(o + i_b * s_ob + row_o[:, None] + o_d[None, :], b_out.to(o.dtype.element_ty), mask=m_out)


@triton.jit
def _merge_splits_kernel(
    o_part,    # [B * Hkv, SPLITS, M, D] fp32
    lse_part,  # [B * Hkv, SPLITS, M] fp32
    o,         # [B, L, Hq, D]
    s_ob, s_ol,
    Hkv, L, SPLITS,
    D: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
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
        b_part = tl.load(o_part + row[:, None] * D + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
        b_acc += b_w[:, None] * b_part
        b_den += b_w
    b_out = b_acc / b_den[:, None]
    row_o = (o_m // G) * s_ol + (i_h * G + o_m % G) * D
    tl.store(o + i_b * s_ob + row_o[:, None] + o_d[None, :], b_out.to(o.dtype.element_ty),
             mask=m_m[:, None] & m_d[None, :])


def _check_layout(q, k_pool, v_pool, slot_table, block_k, block_v, out, k_scale, v_scale) -> None:
    """Heads D apart and unit stride inside a head: the kernel adds head * D with D a
    constexpr, so a head dim like 72 keeps 16-byte vector loads."""
    D = q.shape[-1]
    named = (("q", q), ("k_pool", k_pool), ("v_pool", v_pool), ("block_k", block_k), ("block_v", block_v))
    for name, t in named:
        if t.numel() and (t.stride(-1) != 1 or t.stride(-2) != D):
            raise ValueError(f"draft_attention: argument `{name}`: expected contiguous heads (strides "
                             f"(..., {D}, 1)), got strides {t.stride()}")
    if slot_table.numel() and slot_table.stride(-1) != 1:
        raise ValueError(f"draft_attention: argument `slot_table`: expected a contiguous last dim, "
                         f"got strides {slot_table.stride()}")
    if k_pool.stride() != v_pool.stride():
        raise ValueError(f"draft_attention: arguments `k_pool`/`v_pool`: expected equal strides, "
                         f"got {k_pool.stride()} and {v_pool.stride()}")
    if block_k.stride() != block_v.stride():
        raise ValueError(f"draft_attention: arguments `block_k`/`block_v`: expected equal strides, "
                         f"got {block_k.stride()} and {block_v.stride()}")
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"draft_attention: argument `{name}`: expected a contiguous tensor, "
                             f"got strides {t.stride()}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or not out.is_contiguous()):
        raise ValueError(f"draft_attention: argument `out`: expected a contiguous {tuple(q.shape)} "
                         f"{q.dtype} tensor on {q.device}, got {tuple(out.shape)} {out.dtype}")


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int | None:
    """SMs of the GPU the op runs on; on meta tensors the GPU a compile check stands for."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return meta_sm_count.get() if device.type == "meta" else None


def num_splits(batch: int, kv_heads: int, table_width: int, sms: int | None) -> int:
    """Splits of the context so a small batch still fills the GPU (about two waves of
    programs); 1 without a GPU or for narrow tables. Shapes only: fixed per batch bucket."""
    if sms is None or table_width < 1024 or batch * kv_heads == 0:
        return 1
    return max(1, min(triton.cdiv(2 * sms, batch * kv_heads), table_width // 512, 64))


def _launch(q, k_pool, v_pool, slot_table, slot_rows, ctx_lens, block_k, block_v, scale, splits, o,
            k_scale=None, v_scale=None):
    """The kernels, without the argument checks (tests call it with a length past the row)."""
    B, L, Hq, D = q.shape
    Hkv = k_pool.shape[1]
    G = Hq // Hkv
    BLOCK_M = max(16, triton.next_power_of_2(L * G))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N = 64 if BLOCK_M * BLOCK_D <= 4096 else 32
    split = splits > 1
    o_part = q.new_empty((B * Hkv, splits, L * G, D) if split else (1,), dtype=torch.float32)
    lse_part = q.new_empty((B * Hkv, splits, L * G) if split else (1,), dtype=torch.float32)
    num_warps = 4 if BLOCK_M * BLOCK_D <= 4096 else 8
    quant = k_pool.dtype == FP8_DTYPE
    # the interpreter has no bf16 arithmetic, and fp32 inputs need IEEE fp32 dots; an fp8
    # pool's tiles convert exactly to the dtype of q
    upcast = q.device.type == "cpu" or q.dtype == torch.float32 or (k_pool.dtype != q.dtype and not quant)
    _draft_attention_kernel[(B * Hkv, splits)](
        q, k_pool, v_pool, slot_table, slot_rows, ctx_lens, block_k, block_v,
        # unread without QUANT: any tensor of the call stands in
        k_scale if quant else lse_part, v_scale if quant else lse_part, o, o_part, lse_part,
        q.stride(0), q.stride(1), k_pool.stride(0), slot_table.stride(0), block_k.stride(0), block_k.stride(1),
        o.stride(0), o.stride(1),
        Hkv, L, slot_table.shape[1], scale * _LOG2E,
        D=D, G=G, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_L=max(16, triton.next_power_of_2(L)),
        BLOCK_D=BLOCK_D, SPLIT=split, UPCAST=upcast, QUANT=quant, num_warps=num_warps, num_stages=3,
    )
    if split:
        _merge_splits_kernel[(B * Hkv,)](
            o_part, lse_part, o, o.stride(0), o.stride(1), Hkv, L, splits,
            D=D, G=G, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=num_warps,
        )
    return o


def draft_attention_splits(
    q: torch.Tensor,           # [B, L, Hq, D]
    k_pool: torch.Tensor,      # [N, Hkv, D]
    v_pool: torch.Tensor,      # [N, Hkv, D]
    slot_table: torch.Tensor,  # [R, S] int32/int64
    slot_rows: torch.Tensor,   # [B] int32/int64
    ctx_lens: torch.Tensor,    # [B] int32/int64
    block_k: torch.Tensor,     # [B, L, Hkv, D]
    block_v: torch.Tensor,     # [B, L, Hkv, D]
    scale: float,
    splits: int,
    out: torch.Tensor | None,  # [B, L, Hq, D] contiguous, dtype of q; None: allocated here
    k_scale: torch.Tensor | None = None,  # [Hkv] fp32, for an fp8 pool only
    v_scale: torch.Tensor | None = None,  # [Hkv] fp32, for an fp8 pool only
) -> torch.Tensor:             # [B, L, Hq, D], dtype of q
    """``draft_attention`` with an explicit number of context splits and output buffer
    (tests poison the buffer; benchmarks pick the splits)."""
    check_draft_attention_args(q, k_pool, v_pool, slot_table, slot_rows, ctx_lens, block_k, block_v,
                               k_scale, v_scale)
    _check_layout(q, k_pool, v_pool, slot_table, block_k, block_v, out, k_scale, v_scale)
    if splits < 1:
        raise ValueError(f"draft_attention: argument `splits`: expected >= 1, got {splits}")
    o = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if o.numel() == 0:
        return o
    return _launch(q, k_pool, v_pool, slot_table, slot_rows, ctx_lens, block_k, block_v, scale, splits, o,
                   k_scale, v_scale)


def draft_attention(
    q: torch.Tensor,           # [B, L, Hq, D] block queries (after q_norm + RoPE)
    k_pool: torch.Tensor,      # [N, Hkv, D] context keys of one draft layer
    v_pool: torch.Tensor,      # [N, Hkv, D]
    slot_table: torch.Tensor,  # [R, S] int32/int64: slot of context position t at column t
    slot_rows: torch.Tensor,   # [B] int32/int64: the table row of each request
    ctx_lens: torch.Tensor,    # [B] int32/int64: context length of each request, 0..S
    block_k: torch.Tensor,     # [B, L, Hkv, D]
    block_v: torch.Tensor,     # [B, L, Hkv, D]
    scale: float,
    k_scale: torch.Tensor | None = None,  # [Hkv] fp32 dequantisation scales of an fp8 pool
    v_scale: torch.Tensor | None = None,  # [Hkv] fp32
) -> torch.Tensor:             # [B, L, Hq, D], dtype of q
    if not math.isfinite(scale):
        raise ValueError(f"draft_attention: argument `scale`: expected a finite number, got {scale}")
    splits = num_splits(q.shape[0], k_pool.shape[1] if k_pool.ndim == 3 else 1, slot_table.shape[-1],
                        sm_count(q.device))
    return draft_attention_splits(q, k_pool, v_pool, slot_table, slot_rows, ctx_lens, block_k, block_v,
                                  scale, splits, None, k_scale, v_scale)
