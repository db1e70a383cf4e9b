"""Context K/V of committed tokens into the draft pool, in plain torch.

The caller projects the context features once for every draft layer (one GEMM over the
stacked k_proj/v_proj weights); this op applies each layer's ``k_norm`` (RMSNorm over
the head dim) and RoPE to the keys and writes keys and values at the tokens' slots.
``norm_rope`` is also what the drafter applies to block queries and keys, so context and
block keys go through the same arithmetic (fp32 throughout, one cast at the end).

An fp8 pool (``FP8_DTYPE``, e4m3) stores ``x / scale`` rounded to the nearest e4m3 value
(ties to even) and saturated at +-448, with one fixed fp32 scale per (layer, KV head)
(``k_scale`` / ``v_scale``; the drafter derives them from its weights, see
``DFlashDrafter.fp8_scales``); a reader multiplies by the scale again. Any other pool
dtype takes no scales and is written by a plain cast.
"""

from __future__ import annotations

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)
# the quantised draft pool: e4m3 (SGLang's "fp8_e4m3" on NVIDIA), finite range +-448
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_fp8(
    x: torch.Tensor,      # [..., Hkv, D] values to store
    scale: torch.Tensor,  # [..., Hkv] fp32 per-head scales, broadcast over D
) -> torch.Tensor:        # [..., Hkv, D] FP8_DTYPE
    """``x / scale`` in fp32, saturated at +-FP8_MAX, rounded to e4m3 (ties to even)."""
    return (x.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def check_pool_scales(op: str, pool: torch.Tensor, scales: dict, shape: tuple) -> None:
    """An fp8 pool needs an fp32 scale tensor of ``shape`` per name in ``scales`` (on the
    pool's device); any other pool dtype takes none."""
    for name, t in scales.items():
        if pool.dtype != FP8_DTYPE:
            if t is not None:
                raise ValueError(f"{op}: argument `{name}`: expected None for a {pool.dtype} pool "
                                 f"(scales belong to {FP8_DTYPE} pools), got a tensor")
        elif (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != torch.float32
              or t.device != pool.device):
            got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else t
            raise ValueError(f"{op}: argument `{name}`: expected a {list(shape)} float32 tensor on "
                             f"{pool.device} (the pool is {FP8_DTYPE}), got {got}")


def norm_rope(
    x: torch.Tensor,       # [..., Hx, D]
    weight: torch.Tensor,  # [D] RMSNorm weight (or broadcastable to x)
    cos: torch.Tensor,     # [..., D/2] fp32, broadcast over heads
    sin: torch.Tensor,     # [..., D/2] fp32
    eps: float,
) -> torch.Tensor:         # [..., Hx, D] fp32
    """RMSNorm over the head dim, then Qwen3 (rotate-half) RoPE; fp32 result."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"draft_kv_append: argument `{name}`: expected {expected}, got {got}")


def check_draft_kv_args(kv, k_norm, cos, sin, slots, k_pool, v_pool, k_scale=None, v_scale=None) -> None:
    """Shapes, dtypes and devices shared by the twin and the kernel; slot values only on
    CPU (checking them on a GPU would cost a device sync every call)."""
    if kv.ndim != 5 or kv.shape[2] != 2:
        _fail("kv", "[T, Ld, 2, Hkv, D] (keys then values)", tuple(kv.shape))
    T, Ld, _, Hkv, D = kv.shape
    if D % 2:
        _fail("kv", "an even head dim (RoPE rotates halves)", D)
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if t.ndim != 4 or t.shape[0] != Ld or tuple(t.shape[2:]) != (Hkv, D):
            _fail(name, f"[{Ld}, N, {Hkv}, {D}]", tuple(t.shape))
    if v_pool.shape != k_pool.shape or v_pool.dtype != k_pool.dtype:
        _fail("v_pool", f"the shape and dtype of k_pool {tuple(k_pool.shape)} {k_pool.dtype}",
              f"{tuple(v_pool.shape)} {v_pool.dtype}")
    check_pool_scales("draft_kv_append", k_pool, {"k_scale": k_scale, "v_scale": v_scale}, (Ld, Hkv))
    if tuple(k_norm.shape) != (Ld, D):
        _fail("k_norm", f"[{Ld}, {D}]", tuple(k_norm.shape))
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (T, D // 2) or t.dtype != torch.float32:
            _fail(name, f"[{T}, {D // 2}] float32", f"{tuple(t.shape)} {t.dtype}")
    if tuple(slots.shape) != (T,) or slots.dtype not in _INDEX_DTYPES:
        _fail("slots", f"[{T}] int32/int64", f"{tuple(slots.shape)} {slots.dtype}")
    floats = (kv, k_norm, k_pool, v_pool)
    if any(not t.is_floating_point() for t in floats):
        _fail("kv/k_norm/k_pool/v_pool", "floating-point tensors", [t.dtype for t in floats])
    devices = {t.device for t in (*floats, cos, sin, slots)}
    if len(devices) != 1:
        _fail("tensors", "all on one device", sorted(map(str, devices)))
    N = k_pool.shape[1]
    if kv.device.type == "cpu" and T and (slots.min() < 0 or slots.max() >= N):
        _fail("slots", f"values in 0..{N - 1}", f"range {int(slots.min())}..{int(slots.max())}")


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
    if kv.shape[0] == 0:
        return
    # k_norm [Ld, 1, D] and cos/sin [T, 1, D/2] broadcast over tokens and heads
    k = norm_rope(kv[:, :, 0], k_norm[:, None], cos[:, None], sin[:, None], eps)  # [T, Ld, Hkv, D]
    v = kv[:, :, 1]
    if k_pool.dtype == FP8_DTYPE:
        k, v = quantize_fp8(k, k_scale), quantize_fp8(v, v_scale)
    idx = slots.long()
    k_pool[:, idx] = k.transpose(0, 1).to(k_pool.dtype)
    v_pool[:, idx] = v.transpose(0, 1).to(v_pool.dtype)
