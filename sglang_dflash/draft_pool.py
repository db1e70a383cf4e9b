"""The draft K/V pool: context keys and values of every committed token, by slot.

Float pools (fp32 / bf16 / fp16) hold the values; an fp8 (e4m3) pool holds them divided
by fixed per-(layer, KV head) scales derived from the drafter's weights (``fp8_scales``).
The drafter writes a pool with ``draft_kv_append`` and reads it with ``draft_attention``.
"""

from __future__ import annotations

import math

import torch

from .kernels.naive.draft_kv import FP8_DTYPE, FP8_MAX

# what a draft K/V pool may hold: the float dtypes by a cast, e4m3 with scales
POOL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, FP8_DTYPE)
# fp8 scale bounds allow this much for the bf16 roundings between the bound and the store
_FP8_BOUND_MARGIN = 1.02


class DraftKVPool:
    """Context K/V of every committed token of every draft layer, addressed by slot.

    A float pool holds the values; an fp8 pool (e4m3) holds ``value / scale`` with one
    fixed fp32 scale per (layer, KV head), ``k_scale`` / ``v_scale`` [Ld, Hkv] (None for a
    float pool), so readers multiply back. The scales are not per token: a slot costs
    exactly ``bytes_per_token``, the figure SGLang's memory planner charges.
    """

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str,
                 scales: tuple[torch.Tensor, torch.Tensor] | None = None):
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DraftKVPool: argument `{name}`: expected an integer >= 1, "
                                 f"got {value!r}")
        if not isinstance(num_slots, int) or num_slots < 0:
            raise ValueError(f"DraftKVPool: argument `num_slots`: expected an integer >= 0, "
                             f"got {num_slots!r}")
        if dtype not in POOL_DTYPES:
            raise ValueError(f"DraftKVPool: argument `dtype`: expected one of {POOL_DTYPES}, got {dtype}")
        if (dtype == FP8_DTYPE) != (scales is not None):
            raise ValueError(f"DraftKVPool: argument `scales`: an {FP8_DTYPE} pool needs (k_scale, v_scale) "
                             f"and any other dtype none; got dtype {dtype} with scales {scales is not None}")
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [Ld, N, Hkv, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [Ld, N, Hkv, D]
        self.k_scale = self.v_scale = None  # [Ld, Hkv] fp32 for an fp8 pool
        if scales is not None:
            for name, t in zip(("k_scale", "v_scale"), scales):
                if tuple(t.shape) != (num_layers, num_kv_heads) or t.dtype != torch.float32:
                    raise ValueError(f"DraftKVPool: argument `scales` ({name}): expected [{num_layers}, "
                                     f"{num_kv_heads}] float32, got {tuple(t.shape)} {t.dtype}")
            self.k_scale, self.v_scale = (t.to(self.k.device).contiguous() for t in scales)

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one slot over every layer, keys and values."""
        Ld, _, Hkv, D = self.k.shape
        return 2 * Ld * Hkv * D * self.k.element_size()

    def layer_scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(k_scale, v_scale) [Hkv] of one layer; (None, None) for a float pool."""
        if self.k_scale is None:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]


@torch.no_grad()
def fp8_scales(drafter) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_scale, v_scale) [Ld, Hkv] fp32: fixed scales of an e4m3 pool, from the weights.

    Each is a bound on what the pool can receive, times 1.02 for bf16 roundings, over
    448 (e4m3's largest finite value), rounded up to a power of two (so ``x / scale``
    and ``q * scale`` are exact):

    - keys are stored after ``k_norm`` and RoPE. The RMSNorm leaves a head vector of
      L2 norm below ``sqrt(D)``; its weight scales component i by ``w_i``, and RoPE
      rotates the pairs (i, i + D/2), so no stored component exceeds
      ``max|k_norm.weight| * sqrt(D)`` (one bound per layer, shared by its heads);
    - values are ``v_proj`` of the context feature ``c = hidden_norm(fc(features))``,
      also an RMSNorm output: ``||c||_2 < max|hidden_norm.weight| * sqrt(H)``, so by
      Cauchy-Schwarz ``|v_j| <= ||v_proj.weight[j]||_2 * ||c||_2 + |bias_j|``; a head's
      bound is the largest over its D rows.

    Why fixed scales and not per-token ones: e4m3 is a float format, so a loose bound
    costs no precision where it matters. Any entry of at least ``2^-6 * scale`` (at
    most bound / 14,000) keeps 3 mantissa bits, a rounding error of at most 2^-4 of
    the value; typical keys are ``|w|`` (bound / sqrt(D)) and typical values about
    bound / sqrt(H), hundreds of times above that floor. Per-token scales would add
    4 B per (token, layer, head, K/V), +5.6 % at head dim 72, that SGLang's planner
    (1 byte per element) does not charge, and a reduction before every store. The
    store also saturates at +-448, so an entry past a bound is clipped, never NaN.
    """
    c = drafter.cfg
    D, H = c.head_dim, c.hidden_size
    ctx_norm = drafter.hidden_norm.weight.float().abs().max() * math.sqrt(H)
    k_bounds, v_bounds = [], []
    for layer in drafter.layers:
        attn = layer.self_attn
        k_bound = attn.k_norm.weight.float().abs().max() * math.sqrt(D)
        k_bounds.append(k_bound.expand(c.num_key_value_heads))
        rows = attn.v_proj.weight.float().norm(dim=1) * ctx_norm  # [Hkv * D]
        if attn.v_proj.bias is not None:
            rows = rows + attn.v_proj.bias.float().abs()
        v_bounds.append(rows.view(c.num_key_value_heads, D).amax(dim=1))
    return tuple(_pow2_scale(torch.stack(b)) for b in (k_bounds, v_bounds))


def _pow2_scale(bound: torch.Tensor) -> torch.Tensor:
    """The smallest power of two s with bound * margin <= s * 448 (fp32); 1 for a zero bound."""
    target = (bound.float() * _FP8_BOUND_MARGIN / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    scale = torch.exp2(torch.ceil(torch.log2(target)))
    return torch.where(bound > 0, scale, torch.ones_like(scale)).contiguous()
