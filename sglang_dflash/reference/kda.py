"""Kimi Delta Attention (KDA) in plain torch, with HF ``modeling_kimi.py`` weight names.

Per token: q, k, v projections -> depthwise causal short conv + SiLU (the conv window
holds the last ``W - 1`` pre-conv inputs) -> q, k L2-normalised per head -> the gated
delta rule on a ``[K, V]`` fp32 state per head -> RMSNorm of the output per head, gated by
``sigmoid(g_b(g_a(x)))`` -> ``o_proj``. The decay is ``g = -exp(A_log) * softplus(f_b(f_a(x))
+ dt_bias)`` per channel, ``beta = sigmoid(b_proj(x))``.

The helpers ``linear``, ``pointwise`` and ``rms_norm`` are shared with the rest of the
reference target. With ``invariant=True`` every token's result is bit-identical however
many tokens run together (one extend of T tokens == T single-token extends), which the
reference loop needs so that speculative decoding reproduces plain decoding exactly on
CPU. The rules that give it: GEMMs as batches of 1-row GEMMs (a GEMM picks its kernel by
row count); transcendental functions on one token at a time (CPU kernels run a vector
body and a scalar tail, whose results differ in the last bit); reductions over the
contiguous last dim, or over per-token tensors of one fixed shape (the recurrence, MLA's
row-by-row attention); and +, *, /, sqrt anywhere, since those round exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.naive.kda_commit import kda_step

# fla's in-kernel q/k L2 norm: x / sqrt(sum(x^2) + eps)
L2NORM_EPS = 1e-6


def linear(x: torch.Tensor, weight: torch.Tensor, invariant: bool) -> torch.Tensor:
    """``x @ weight.T`` (x [..., I], weight [O, I]); ``invariant``: row-by-row bits."""
    if not invariant:
        return F.linear(x, weight)
    # one 1-row GEMM per token: a plain GEMM picks its kernel (and rounding) by row count
    flat = x.reshape(-1, 1, x.shape[-1])
    out = torch.bmm(flat, weight.t().expand(flat.shape[0], -1, -1))
    return out.view(*x.shape[:-1], weight.shape[0])


def pointwise(fn, x: torch.Tensor, token_dims: int, invariant: bool) -> torch.Tensor:
    """An elementwise ``fn(x)``; ``invariant``: one token (the last ``token_dims`` dims) at a time."""
    if not invariant:
        return fn(x)
    rows = x.reshape(-1, 1, *x.shape[x.ndim - token_dims:])
    return torch.cat([fn(r) for r in rows]).view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """KimiRMSNorm: normalise in fp32, cast back, then scale."""
    xf = x.float()
    # 1 / sqrt rather than rsqrt: both round exactly, so every CPU code path agrees
    xf = xf * (1.0 / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
    return weight * xf.to(x.dtype)


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return xf / torch.sqrt((xf * xf).sum(-1, keepdim=True) + L2NORM_EPS)


class ShortConv(nn.Module):
    """Holds a depthwise conv weight under fla ``ShortConvolution``'s name and shape."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        nn.init.uniform_(self.weight, -1 / math.sqrt(width), 1 / math.sqrt(width))


@dataclass
class KdaRecord:
    """What a commit needs to replay a block's tokens (see ``kda_commit``)."""

    k: torch.Tensor            # [B, T, H, K] fp32, post conv/silu/l2norm
    v: torch.Tensor            # [B, T, H, V] fp32
    g: torch.Tensor            # [B, T, H, K] fp32 log-decay
    beta: torch.Tensor         # [B, T, H] fp32
    conv_inputs: torch.Tensor  # [B, T, C] model dtype, C = 3 * H * K (q | k | v)


class KimiDeltaAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, conv_width: int, eps: float):
        super().__init__()
        H, K, D = num_heads, head_dim, hidden_size
        self.num_heads, self.head_dim, self.eps = H, K, eps
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.k_proj = nn.Linear(D, H * K, bias=False)
        self.v_proj = nn.Linear(D, H * K, bias=False)
        self.q_conv1d = ShortConv(H * K, conv_width)
        self.k_conv1d = ShortConv(H * K, conv_width)
        self.v_conv1d = ShortConv(H * K, conv_width)
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log().view(1, 1, H, 1))
        self.f_a_proj = nn.Linear(D, K, bias=False)
        self.f_b_proj = nn.Linear(K, H * K, bias=False)
        # inverse softplus of a step size drawn log-uniformly in [1e-3, 1e-1] (fla's init)
        dt = torch.empty(H * K).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.b_proj = nn.Linear(D, H, bias=False)
        self.g_a_proj = nn.Linear(D, K, bias=False)
        self.g_b_proj = nn.Linear(K, H * K, bias=False)
        self.o_norm = nn.Module()
        self.o_norm.weight = nn.Parameter(torch.ones(K))
        self.o_proj = nn.Linear(H * K, D, bias=False)

    def empty_state(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A zero recurrent state [B, H, K, V] fp32 and conv window [B, C, W-1] (like's dtype)."""
        H, K, W = self.num_heads, self.head_dim, self.q_conv1d.weight.shape[-1]
        return like.new_zeros(batch, H, K, K, dtype=torch.float32), like.new_zeros(batch, 3 * H * K, W - 1)

    def _short_conv(self, conv_inputs: torch.Tensor, window: torch.Tensor, invariant: bool) -> torch.Tensor:
        """SiLU(causal depthwise conv) of conv_inputs [B, T, C] after window [B, C, W-1]."""
        weight = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])[:, 0]
        W, T = weight.shape[1], conv_inputs.shape[1]
        seq = torch.cat([window.transpose(1, 2), conv_inputs], dim=1)  # [B, W-1+T, C]
        # tap by tap, oldest first: the same elementwise ops for every token, and a
        # contiguous [B, T, C] result (a strided one would change the l2 norm's reduction)
        out = seq[:, :T] * weight[:, 0]
        for w in range(1, W):
            out = out + seq[:, w:w + T] * weight[:, w]
        return pointwise(F.silu, out, 1, invariant)

    def _gate(self, x: torch.Tensor, invariant: bool) -> torch.Tensor:
        H, K = self.num_heads, self.head_dim
        raw = linear(linear(x, self.f_a_proj.weight, invariant), self.f_b_proj.weight, invariant)
        raw = raw.float().unflatten(-1, (H, K)) + self.dt_bias.float().view(H, K)
        return -self.A_log.float().view(H, 1).exp() * pointwise(F.softplus, raw, 2, invariant)

    def forward(
        self,
        x: torch.Tensor,       # [B, T, D]
        state: torch.Tensor,   # [B, H, K, V] fp32 recurrent state before the first token
        window: torch.Tensor,  # [B, C, W-1] conv window before the first token
        invariant: bool,
    ) -> tuple[torch.Tensor, KdaRecord]:
        """Output [B, T, D] and the per-token record; ``state``/``window`` are not mutated."""
        H, K = self.num_heads, self.head_dim
        proj = [linear(x, p.weight, invariant) for p in (self.q_proj, self.k_proj, self.v_proj)]
        conv_inputs = torch.cat(proj, dim=-1)
        q, k, v = self._short_conv(conv_inputs, window, invariant).unflatten(-1, (3, H, K)).unbind(2)
        q, k, v = l2_norm(q) * K ** -0.5, l2_norm(k), v.float()
        g = self._gate(x, invariant)
        beta = pointwise(torch.sigmoid, linear(x, self.b_proj.weight, invariant).float(), 1, invariant)
        outs = []
        # unbind, not k[:, t]: its backward is one stack instead of T full-size scatters
        for q_t, k_t, v_t, g_t, beta_t in zip(*(z.unbind(1) for z in (q, k, v, g, beta))):
            state = kda_step(state, k_t, v_t, g_t, beta_t)
            outs.append((q_t[..., None] * state).sum(-2))
        o = torch.stack(outs, dim=1)  # [B, T, H, V]
        gate = linear(linear(x, self.g_a_proj.weight, invariant), self.g_b_proj.weight, invariant)
        gate = pointwise(torch.sigmoid, gate.float().unflatten(-1, (H, K)), 2, invariant)
        o = rms_norm(o, self.o_norm.weight.float(), self.eps) * gate
        out = linear(o.flatten(2).to(x.dtype), self.o_proj.weight, invariant)
        return out, KdaRecord(k, v, g, beta, conv_inputs)


def verify_memory_per_request(num_kda_layers: int, num_heads: int, head_dim: int, conv_width: int,
                              block_size: int, conv_dtype: torch.dtype) -> dict[str, int]:
    """Bytes one request keeps across a verify block: the replay record vs the 16-state scheme.

    Counted from the buffers themselves (allocated on the meta device, same shapes and
    dtypes as ``KimiDeltaAttention.forward`` records), not from a formula.
    """
    L, H, K, C = block_size, num_heads, head_dim, 3 * num_heads * head_dim

    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    record = KdaRecord(k=meta(1, L, H, K), v=meta(1, L, H, K), g=meta(1, L, H, K), beta=meta(1, L, H),
                       conv_inputs=meta(1, L, C, dtype=conv_dtype))
    record_bytes = sum(t.nbytes for t in vars(record).values())
    state_bytes = meta(1, H, K, K).nbytes + meta(1, C, conv_width - 1, dtype=conv_dtype).nbytes
    return {
        "committed_state": num_kda_layers * state_bytes,
        "replay_record": num_kda_layers * record_bytes,
        # keeping the state after every block position instead, to scatter the accepted one
        "intermediate_states": num_kda_layers * L * state_bytes,
    }
