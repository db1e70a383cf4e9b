"""The DFlash draft model in torch, with the context K/V of committed tokens cached by slot.

Math (z-lab's ``DFlashDraftModel``, SGLang's ``models/dflash.py``): the target's residual
streams at ``target_layer_ids``, concatenated, go through ``fc`` and ``hidden_norm`` to the
context feature ``c_t``. Each draft layer is Qwen3-style pre-norm: the block stream goes
through ``input_layernorm``; queries come from the block only; keys/values from
``[c_0..c_{s-1} ; block]`` with the same ``k_proj``/``v_proj``/``k_norm`` for both. The
context features enter ``k_proj``/``v_proj`` as they are, with no ``input_layernorm``
(SGLang's base model makes that choice explicit; only its Laguna variant norms them).
``q_norm``/``k_norm`` are per-head RMSNorms, RoPE is rotate-half at absolute positions,
attention is non-causal with GQA, then ``o_proj``, residual, ``post_attention_layernorm``,
SwiGLU MLP, residual; a final ``norm``. No embedding and no lm_head: the caller embeds the
block with the target's ``embed_tokens`` and applies the target's ``lm_head``.

Context K/V depend only on ``c_t`` and the position, so ``append_context`` computes them
once per committed token for every layer; ``forward_block`` never recomputes them and
keeps nothing of the block. Queries, block keys and context keys share one fp32
norm + RoPE routine (``norm_rope``), cast once at the end. The pool holds them in the
weights' dtype, or another (``kv_dtype``, ``new_pool(dtype=)``): bf16 / fp32 by a cast, fp8
(e4m3) divided by fixed per-(layer, KV head) scales derived from the weights
(``fp8_scales``, which states why they are fixed and why they never overflow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import DrafterConfig, load_drafter_config
from .kernels.naive.draft_attention import draft_attention as _torch_draft_attention
from .draft_pool import POOL_DTYPES, DraftKVPool, fp8_scales
from .kernels.naive.draft_kv import FP8_DTYPE, norm_rope
from .kernels.naive.draft_kv import draft_kv_append as _torch_draft_kv_append

__all__ = ["POOL_DTYPES", "DFlashDrafter", "DraftKVPool", "DrafterOps", "TORCH_OPS", "load_drafter"]

_INDEX_DTYPES = (torch.int32, torch.int64)
_ROPE_TYPES = ("default", "linear")


@dataclass(frozen=True)
class DrafterOps:
    """The two ops the drafter calls; ``backend.Ops`` fits as well (same attribute names)."""

    draft_attention: Callable
    draft_kv_append: Callable


TORCH_OPS = DrafterOps(draft_attention=_torch_draft_attention, draft_kv_append=_torch_draft_kv_append)


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class DraftAttention(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        H, D, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = D
        self.eps = cfg.rms_norm_eps
        self.q_proj = nn.Linear(H, self.num_heads * D, bias=bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=bias)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self,
                x: torch.Tensor,           # [B, L, H] block stream after input_layernorm
                cos: torch.Tensor,         # [B, L, D/2] fp32
                sin: torch.Tensor,         # [B, L, D/2] fp32
                k_ctx: torch.Tensor,       # [N, Hkv, D] this layer's context keys
                v_ctx: torch.Tensor,       # [N, Hkv, D]
                slot_table: torch.Tensor,  # [R, S]
                slot_rows: torch.Tensor,   # [B] the table row of each request
                ctx_lens: torch.Tensor,    # [B]
                attention: Callable,       # the draft_attention op
                k_scale: torch.Tensor | None = None,  # [Hkv] fp32 scales of an fp8 context pool
                v_scale: torch.Tensor | None = None,  # [Hkv] fp32
                ) -> torch.Tensor:         # [B, L, H]
        B, L, _ = x.shape
        D = self.head_dim
        q = norm_rope(self.q_proj(x).view(B, L, self.num_heads, D), self.q_norm.weight, cos, sin, self.eps)
        k = norm_rope(self.k_proj(x).view(B, L, self.num_kv_heads, D), self.k_norm.weight, cos, sin, self.eps)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, D)
        o = attention(q.to(x.dtype), k_ctx, v_ctx, slot_table, slot_rows, ctx_lens, k.to(x.dtype), v, D ** -0.5,
                      k_scale, v_scale)
        return self.o_proj(o.reshape(B, L, self.num_heads * D))


class DraftMLP(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DraftAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DraftMLP(cfg)

    def forward(self, h, cos, sin, k_ctx, v_ctx, slot_table, slot_rows, ctx_lens, attention: Callable,
                k_scale=None, v_scale=None):
        """h [B, L, H] -> [B, L, H]; the other arguments as for ``DraftAttention``."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, k_ctx, v_ctx, slot_table, slot_rows,
                               ctx_lens, attention, k_scale, v_scale)
        return h + self.mlp(self.post_attention_layernorm(h))


def rope_linear_factor(cfg: DrafterConfig) -> float:
    """Position divisor of the config's RoPE: 1 for plain RoPE, ``factor`` for "linear"."""
    if cfg.rope_scaling is None:
        return 1.0
    scaling = dict(cfg.rope_scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ValueError(f"DrafterConfig.rope_scaling: rope type {kind!r} is not implemented "
                         f"(supported: {', '.join(_ROPE_TYPES)})")
    if kind == "default":
        return 1.0
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise ValueError(f"DrafterConfig.rope_scaling: \"linear\" needs a positive `factor`, got {factor!r}")
    return float(factor)


def _check_config(cfg: DrafterConfig) -> None:
    if cfg.num_key_value_heads < 1 or cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"DrafterConfig.num_key_value_heads: {cfg.num_key_value_heads} does not "
                         f"divide num_attention_heads {cfg.num_attention_heads}")
    if cfg.head_dim % 2:
        raise ValueError(f"DrafterConfig.head_dim: expected an even head dim (RoPE rotates halves), "
                         f"got {cfg.head_dim}")
    if not cfg.target_layer_ids:
        raise ValueError("DrafterConfig.target_layer_ids: expected at least one target layer")


class DFlashDrafter(nn.Module):
    """A DFlash drafter; parameter names are the checkpoint's tensor names (no prefix)."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        # the op backend; the caller may point it at the Triton kernels (no fallback)
        self.ops = TORCH_OPS
        H = cfg.hidden_size
        # the target's hidden size equals the drafter's (the block comes from its embed_tokens)
        self.fc = nn.Linear(cfg.num_target_layers * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.layers = nn.ModuleList([DraftLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self._rope_factor = rope_linear_factor(cfg)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self._stacked: tuple[tuple, tuple] | None = None
        # dtype of the pools new_pool makes (None: the weights'); the caller may set it, as ops
        self.kv_dtype: torch.dtype | None = None

    def new_pool(self, num_slots: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> DraftKVPool:
        """A zeroed pool in ``dtype`` (default: ``kv_dtype``, else the weights' dtype); an fp8
        pool gets the current weights' ``fp8_scales`` (make a new pool after the weights change)."""
        w = self.fc.weight
        dtype = dtype or self.kv_dtype or w.dtype
        scales = self.fp8_scales() if dtype == FP8_DTYPE else None
        return DraftKVPool(self.cfg.num_hidden_layers, num_slots, self.cfg.num_key_value_heads,
                           self.cfg.head_dim, dtype, device or w.device, scales)

    def fp8_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_scale, v_scale) [Ld, Hkv] fp32 of an e4m3 pool, fixed from the current weights
        (``draft_pool.fp8_scales`` derives them)."""
        return fp8_scales(self)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [..., D/2] fp32 at integer ``positions`` [...] (HF Qwen3 arithmetic)."""
        device = positions.device
        if device not in self._inv_freq:
            D = self.cfg.head_dim
            exponent = torch.arange(0, D, 2, dtype=torch.int64, device=device).float() / D
            # a module attribute, not a buffer: .to(bfloat16) must not round it
            self._inv_freq[device] = 1.0 / (self.cfg.rope_theta ** exponent) / self._rope_factor
        freqs = positions.float()[..., None] * self._inv_freq[device]
        return freqs.cos(), freqs.sin()

    def _context_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """k_proj/v_proj of every layer stacked [Ld*2*Hkv*D, H] (+ bias), k_norm [Ld, D].

        Built once and reused until a parameter changes (load, optimiser step, .to());
        rebuilt on every call while autograd records, so gradients reach each layer."""
        attns = [layer.self_attn for layer in self.layers]
        params = [p for a in attns for p in (a.k_proj.weight, a.v_proj.weight, a.k_norm.weight)]
        params += [p for a in attns for p in (a.k_proj.bias, a.v_proj.bias) if p is not None]
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        recording = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if not recording and self._stacked is not None and self._stacked[0] == key:
            return self._stacked[1]
        weight = torch.stack([torch.stack([a.k_proj.weight, a.v_proj.weight]) for a in attns])
        bias = None
        if self.cfg.attention_bias:
            bias = torch.stack([torch.stack([a.k_proj.bias, a.v_proj.bias]) for a in attns]).flatten()
        stacked = (weight.flatten(0, 2), bias, torch.stack([a.k_norm.weight for a in attns]))
        self._stacked = None if recording else (key, stacked)
        return stacked

    def _check_pool(self, pool: DraftKVPool) -> None:
        c = self.cfg
        expected = (c.num_hidden_layers, pool.num_slots, c.num_key_value_heads, c.head_dim)
        for name, t in (("pool.k", pool.k), ("pool.v", pool.v)):
            if tuple(t.shape) != expected:
                raise ValueError(f"DFlashDrafter: argument `{name}`: expected [layers, N, kv_heads, "
                                 f"head_dim] = {expected}, got {tuple(t.shape)}")

    def append_context(self, pool: DraftKVPool,
                       features: torch.Tensor,   # [T, n_target_layers * H] target residual streams
                       positions: torch.Tensor,  # [T] int64 absolute positions
                       slots: torch.Tensor,      # [T] int64 pool slots, distinct
                       ) -> None:
        """Write the K/V of every draft layer for T committed tokens at their slots."""
        self._check_pool(pool)
        width = self.fc.in_features
        if features.ndim != 2 or features.shape[1] != width or not features.is_floating_point():
            raise ValueError(f"DFlashDrafter.append_context: argument `features`: expected [T, {width}] "
                             f"floats ({self.cfg.num_target_layers} target layers x hidden "
                             f"{self.cfg.hidden_size}), got {tuple(features.shape)} {features.dtype}")
        T = features.shape[0]
        for name, t in (("positions", positions), ("slots", slots)):
            if tuple(t.shape) != (T,) or t.dtype not in _INDEX_DTYPES:
                raise ValueError(f"DFlashDrafter.append_context: argument `{name}`: expected [{T}] "
                                 f"int32/int64, got {tuple(t.shape)} {t.dtype}")
        ctx = self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))  # [T, H]
        weight, bias, k_norm = self._context_weights()
        c = self.cfg
        kv = F.linear(ctx, weight, bias).view(T, c.num_hidden_layers, 2, c.num_key_value_heads, c.head_dim)
        cos, sin = self.rope(positions)
        self.ops.draft_kv_append(kv, k_norm, cos, sin, slots, pool.k, pool.v, c.rms_norm_eps,
                                 pool.k_scale, pool.v_scale)

    def forward_block(self, pool: DraftKVPool,
                      block_embeds: torch.Tensor,     # [B, L, H] target embeddings of [last, MASK x L-1]
                      block_positions: torch.Tensor,  # [B, L] int64
                      slot_table: torch.Tensor,       # [B, S] int32/int64: slot of context position t
                      ctx_lens: torch.Tensor,         # [B] int: context tokens per request (may be 0), <= S
                      ) -> torch.Tensor:              # [B, L, H] after the final norm
        """One drafter forward over a ragged batch of blocks; request b's context is
        ``slot_table[b, :ctx_lens[b]]``."""
        self._check_pool(pool)
        H = self.cfg.hidden_size
        if block_embeds.ndim != 3 or block_embeds.shape[2] != H or not block_embeds.is_floating_point():
            raise ValueError(f"DFlashDrafter.forward_block: argument `block_embeds`: expected "
                             f"[B, L, {H}] floats, got {tuple(block_embeds.shape)} {block_embeds.dtype}")
        B, L, _ = block_embeds.shape
        if tuple(block_positions.shape) != (B, L) or block_positions.dtype not in _INDEX_DTYPES:
            raise ValueError(f"DFlashDrafter.forward_block: argument `block_positions`: expected "
                             f"[{B}, {L}] int32/int64, got {tuple(block_positions.shape)} "
                             f"{block_positions.dtype}")
        cos, sin = self.rope(block_positions)  # [B, L, D/2]
        rows = torch.arange(B, device=slot_table.device)
        return self.forward_layers(pool, block_embeds, cos, sin, slot_table, rows, ctx_lens)

    def forward_layers(self, pool: DraftKVPool,
                       block_embeds: torch.Tensor,  # [B, L, H]
                       cos: torch.Tensor,           # [B, L, D/2] fp32 RoPE at the block positions
                       sin: torch.Tensor,           # [B, L, D/2] fp32
                       slot_table: torch.Tensor,    # [R, S]: slot of context position t at column t
                       slot_rows: torch.Tensor,     # [B]: the table row of each request
                       ctx_lens: torch.Tensor,      # [B]
                       ) -> torch.Tensor:           # [B, L, H] after the final norm
        """The layers of ``forward_block`` over rows of a shared table (SGLang's
        ``req_to_token``): no host reads, shapes independent of the context lengths."""
        h = block_embeds.to(self.fc.weight.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, pool.k[i], pool.v[i], slot_table, slot_rows, ctx_lens, self.ops.draft_attention,
                      *pool.layer_scales(i))
        return self.norm(h)

    def prepare(self, device: torch.device) -> None:
        """Build what the forward would otherwise build on first use, before serving (and
        before any CUDA graph capture, which must not record one-time set-up): the RoPE
        frequencies on ``device`` and the stacked context weights."""
        self.rope(torch.zeros(1, dtype=torch.int64, device=device))
        with torch.no_grad():
            self._context_weights()


def load_drafter(path, target_hidden: int, dtype: torch.dtype | None = None,
                 target_vocab: int | None = None) -> DFlashDrafter:
    """A DFlash drafter from a checkpoint directory, in eval mode: config.json and
    safetensors only, every tensor name and shape checked (``checkpoint``; copies of the
    target's embedding / lm_head against ``target_vocab`` when given), no code run."""
    # safetensors is needed only where a checkpoint is read (the GPU check builds drafters
    # on a machine that may not have it)
    from .checkpoint import load_drafter_state_dict

    cfg = load_drafter_config(path)
    drafter = DFlashDrafter(cfg)
    state = load_drafter_state_dict(path, cfg, target_hidden, dtype=dtype, target_vocab=target_vocab)
    drafter.load_state_dict(state, strict=True)
    return drafter.eval()
