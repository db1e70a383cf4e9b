"""Context K/V of committed tokens into the draft pool, in plain torch.

The caller projects the context features once for every draft layer (one GEMM over the
stacked k_proj/v_proj weights); this op applies each layer's ``k_norm`` (RMSNorm over
the head dim) and RoPE to the keys and writes keys and values at the tokens' slots.
``norm_rope`` is also what the drafter applies to block queries and keys, so context and
block keys go through the same arithmetic (fp32 throughout, one cast at the end).
"""

from __future__ import annotations

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)


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


def check_draft_kv_args(kv, k_norm, cos, sin, slots, k_pool, v_pool) -> None:
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
    if v_pool.shape != k_pool.shape:
        _fail("v_pool", f"the shape of k_pool {tuple(k_pool.shape)}", tuple(v_pool.shape))
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
) -> None:
    check_draft_kv_args(kv, k_norm, cos, sin, slots, k_pool, v_pool)
    if kv.shape[0] == 0:
        return
    # k_norm [Ld, 1, D] and cos/sin [T, 1, D/2] broadcast over tokens and heads
    k = norm_rope(kv[:, :, 0], k_norm[:, None], cos[:, None], sin[:, None], eps)  # [T, Ld, Hkv, D]
    idx = slots.long()
    k_pool[:, idx] = k.transpose(0, 1).to(k_pool.dtype)
    v_pool[:, idx] = kv[:, :, 1].transpose(0, 1).to(v_pool.dtype)
