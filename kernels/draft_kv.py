"""Context K/V of committed tokens into the draft pool (Triton): k_norm + RoPE + scatter.

The GEMM (context features through the stacked k_proj/v_proj of every draft layer) stays
in torch in the caller; this kernel does the memory-bound rest in one pass. One program
per (token, draft layer) handles every KV head: it loads the key as two halves (RoPE
rotates halves), RMS-normalises over the head dim, rotates, and stores keys and values at
the token's slot in the pool's dtype.

An fp8 pool (``QUANT``) stores ``x / scale`` (``div_rn``: IEEE division, as torch's) with the
(layer, head) scales, rounded to e4m3 in fp32 arithmetic by ``_round_to_e4m3`` (ties to
even, saturated at +-448) before the cast. The cast alone would do the same on the GPU,
but the CPU interpreter's fp32 -> e4m3 conversion rounds ties away from zero, drops the
carry of a round-up into the exponent (31.2 -> 16 instead of 32) and does not saturate
(500 -> 256); a value already on the e4m3 grid converts exactly in both.

Same result as the twin ``sglang_dflash.kernels.naive.draft_kv`` up to fp32 rounding
order (bit for bit on fp8 pools whenever the fp32 values agree); slots outside ``slots``
are never written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive.draft_kv import FP8_DTYPE, FP8_MAX, check_draft_kv_args

_E4M3_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _round_to_e4m3(x):
    """fp32 x -> the nearest e4m3 value (ties to even), saturated at +-448, still fp32.

    e4m3 keeps 3 mantissa bits, so in x's binade (fp32 exponent e) its spacing is
    2^(e - 127 - 3); below 2^-6 (e4m3 subnormals) the spacing stays 2^-9. Scaling by the
    inverse spacing (a power of two: exact) leaves |y| < 16; adding and subtracting
    1.5 * 2^23 rounds y to an integer, ties to even, in IEEE fp32.
    """
    x = tl.minimum(tl.maximum(x, -_E4M3_MAX), _E4M3_MAX)
    e = tl.maximum((x.to(tl.int32, bitcast=True) >> 23) & 0xFF, 127 - 6)
    inv_spacing = ((127 + 127 + 3 - e) << 23).to(tl.float32, bitcast=True)
    spacing = ((e - 3) << 23).to(tl.float32, bitcast=True)
    y = x * inv_spacing
    y = (y + 12582912.0) - 12582912.0
    return y * spacing


@triton.jit
def _to_pool(x, p_scale, m_h, QUANT: tl.constexpr):
    """x [BH, BHALF] fp32 -> what the pool stores: x / scale on the e4m3 grid when QUANT
    (p_scale [BH] points at the heads' scales), else x as is."""
    if QUANT:
        b_scale = tl.load(p_scale, mask=m_h, other=1.0)
        x = _round_to_e4m3(tl.math.div_rn(x, b_scale[:, None]))
    return x


@triton.jit
def _draft_kv_append_kernel(
    kv,      # [T, Ld, 2, Hkv, D]
    k_norm,  # [Ld, D] contiguous
    cos,     # [T, D/2] fp32 contiguous
    sin,     # [T, D/2] fp32 contiguous
    slots,   # [T]
    k_pool,  # [Ld, N, Hkv, D]
    v_pool,  # [Ld, N, Hkv, D] (strides of k_pool)
    k_scale,  # [Ld, Hkv] fp32 contiguous when QUANT
    v_scale,  # [Ld, Hkv] fp32 contiguous when QUANT
    s_xt, s_xl, s_xkv, s_xh, s_pl, s_pn, s_ph,
    Hkv, D, eps,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, QUANT: tl.constexpr,
):
    i_t, i_l = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    half = D // 2
    o_h = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_HALF)
    m_hd = (o_h < Hkv)[:, None] & (o_d < half)[None, :]
    # [BH, BHALF] offsets of the first half of each head; the second half is + half
    off_x = o_h[:, None] * s_xh + o_d[None, :]
    p_k = kv + i_t * s_xt + i_l * s_xl + off_x
    b_k1 = tl.load(p_k, mask=m_hd, other=0.0).to(tl.float32)
    b_k2 = tl.load(p_k + half, mask=m_hd, other=0.0).to(tl.float32)
    b_rstd = 1.0 / tl.sqrt((tl.sum(b_k1 * b_k1, axis=1) + tl.sum(b_k2 * b_k2, axis=1)) / D + eps)
    m_d = o_d < half
    b_w1 = tl.load(k_norm + i_l * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_w2 = tl.load(k_norm + i_l * D + half + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_k1 = b_k1 * b_rstd[:, None] * b_w1[None, :]
    b_k2 = b_k2 * b_rstd[:, None] * b_w2[None, :]
    b_cos = tl.load(cos + i_t * half + o_d, mask=m_d, other=0.0)[None, :]
    b_sin = tl.load(sin + i_t * half + o_d, mask=m_d, other=0.0)[None, :]

    i_slot = tl.load(slots + i_t).to(tl.int64)
    off_p = i_l * s_pl + i_slot * s_pn + o_h[:, None] * s_ph + o_d[None, :]
    dtype = k_pool.dtype.element_ty
    m_h = o_h < Hkv
    p_ks, p_vs = k_scale + i_l * Hkv + o_h, v_scale + i_l * Hkv + o_h
    b_r1, b_r2 = b_k1 * b_cos - b_k2 * b_sin, b_k2 * b_cos + b_k1 * b_sin
    tl.store(k_pool + off_p, _to_pool(b_r1, p_ks, m_h, QUANT).to(dtype), mask=m_hd)
    tl.store(k_pool + off_p + half, _to_pool(b_r2, p_ks, m_h, QUANT).to(dtype), mask=m_hd)
    # values: copied (cast to the pool dtype, or quantised), both halves
    p_v = p_k + s_xkv
    b_v1 = tl.load(p_v, mask=m_hd, other=0.0).to(tl.float32)
    b_v2 = tl.load(p_v + half, mask=m_hd, other=0.0).to(tl.float32)
    tl.store(v_pool + off_p, _to_pool(b_v1, p_vs, m_h, QUANT).to(dtype), mask=m_hd)
    tl.store(v_pool + off_p + half, _to_pool(b_v2, p_vs, m_h, QUANT).to(dtype), mask=m_hd)


def _check_layout(kv, k_norm, cos, sin, k_pool, v_pool, k_scale, v_scale) -> None:
    for name, t in (("kv", kv), ("k_pool", k_pool), ("v_pool", v_pool)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"draft_kv_append: argument `{name}`: expected a contiguous last "
                             f"dim, got strides {t.stride()}")
    scales = [(n, t) for n, t in (("k_scale", k_scale), ("v_scale", v_scale)) if t is not None]
    for name, t in (("k_norm", k_norm), ("cos", cos), ("sin", sin), *scales):
        if not t.is_contiguous():
            raise ValueError(f"draft_kv_append: argument `{name}`: expected a contiguous tensor, "
                             f"got strides {t.stride()}")
    if k_pool.stride() != v_pool.stride():
        raise ValueError(f"draft_kv_append: arguments `k_pool`/`v_pool`: expected equal strides, "
                         f"got {k_pool.stride()} and {v_pool.stride()}")


def draft_kv_append(
    kv: torch.Tensor,      # [T, Ld, 2, Hkv, D] k_proj / v_proj outputs of every draft layer
    k_norm: torch.Tensor,  # [Ld, D] k_norm weights
    cos: torch.Tensor,     # [T, D/2] fp32 RoPE cos at each token's position
    sin: torch.Tensor,     # [T, D/2] fp32
    slots: torch.Tensor,   # [T] int32/int64 pool slots, distinct
    k_pool: torch.Tensor,  # [Ld, N, Hkv, D] written in place at slots
    v_pool: torch.Tensor,  # [Ld, N, Hkv, D]
    eps: float,
    k_scale: torch.Tensor | None = None,  # [Ld, Hkv] fp32, for an fp8 pool only
    v_scale: torch.Tensor | None = None,  # [Ld, Hkv] fp32, for an fp8 pool only
) -> None:
    check_draft_kv_args(kv, k_norm, cos, sin, slots, k_pool, v_pool, k_scale, v_scale)
    _check_layout(kv, k_norm, cos, sin, k_pool, v_pool, k_scale, v_scale)
    T, Ld, _, Hkv, D = kv.shape
    if T == 0 or Ld == 0:
        return
    quant = k_pool.dtype == FP8_DTYPE
    _draft_kv_append_kernel[(T, Ld)](
        kv, k_norm, cos, sin, slots, k_pool, v_pool,
        # unread without QUANT: any tensor of the call stands in
        k_scale if quant else k_norm, v_scale if quant else k_norm,
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        Hkv, D, eps,
        BLOCK_H=triton.next_power_of_2(Hkv), BLOCK_HALF=triton.next_power_of_2(D // 2), QUANT=quant,
    )
