"""Draft attention in plain torch: block queries over paged context K/V plus the block's own.

Request ``b`` attends, non-causally, to the keys of its context positions
``0 .. min(ctx_lens[b], S) - 1``, stored in the pool at ``slot_table[slot_rows[b], t]``
(a row of SGLang's ``req_to_token``, or of any ``[R, S]`` table), followed by the ``L``
keys of its own block. Scores and softmax in fp32; the output takes the dtype of ``q``.
An fp8 pool comes with its layer's per-KV-head scales (``k_scale`` / ``v_scale``, see
``naive.draft_kv``): its keys and values are read as ``pool * scale``; the block's own
keys and values are never quantised.

The context is folded in column chunks with a running (max, sum, weighted values), so
memory stays bounded when the table is as wide as the model's context (a ``[B, S]``
gather of keys would not fit); the loop bounds depend only on shapes. Differentiable
(the reference training script runs through it).
"""

from __future__ import annotations

import torch

from .draft_kv import FP8_DTYPE, check_pool_scales

_INDEX_DTYPES = (torch.int32, torch.int64)
# context columns folded at once: bounds the gathered keys to B x 4096 x Hkv x D
_CHUNK = 4096


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"draft_attention: argument `{name}`: expected {expected}, got {got}")


def _check_index_args(B: int, slot_table, slot_rows, ctx_lens) -> None:
    if slot_table.ndim != 2 or slot_table.dtype not in _INDEX_DTYPES:
        _fail("slot_table", "[R, S] int32/int64", f"{tuple(slot_table.shape)} {slot_table.dtype}")
    for name, t in (("slot_rows", slot_rows), ("ctx_lens", ctx_lens)):
        if tuple(t.shape) != (B,) or t.dtype not in _INDEX_DTYPES:
            _fail(name, f"[{B}] int32/int64", f"{tuple(t.shape)} {t.dtype}")


def check_draft_attention_args(q, k_pool, v_pool, slot_table, slot_rows, ctx_lens, block_k, block_v,
                               k_scale=None, v_scale=None) -> None:
    """Shapes, dtypes and devices shared by the twin and the kernel; index values only
    on CPU (checking them on a GPU would cost a device sync every call)."""
    if q.ndim != 4:
        _fail("q", "[B, L, Hq, D]", tuple(q.shape))
    B, L, Hq, D = q.shape
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if t.ndim != 3 or t.shape[2] != D:
            _fail(name, f"[N, Hkv, {D}]", tuple(t.shape))
    if v_pool.shape != k_pool.shape or v_pool.dtype != k_pool.dtype:
        _fail("v_pool", f"the shape and dtype of k_pool {tuple(k_pool.shape)} {k_pool.dtype}",
              f"{tuple(v_pool.shape)} {v_pool.dtype}")
    Hkv = k_pool.shape[1]
    if Hkv == 0 or Hq % Hkv:
        _fail("k_pool", f"a KV head count dividing Hq={Hq}", Hkv)
    check_pool_scales("draft_attention", k_pool, {"k_scale": k_scale, "v_scale": v_scale}, (Hkv,))
    if FP8_DTYPE in (q.dtype, block_k.dtype, block_v.dtype):
        _fail("q/block_k/block_v", "unquantised floats (only the pool may be fp8)",
              [q.dtype, block_k.dtype, block_v.dtype])
    for name, t in (("block_k", block_k), ("block_v", block_v)):
        if tuple(t.shape) != (B, L, Hkv, D):
            _fail(name, f"[B, L, Hkv, D] = {(B, L, Hkv, D)}", tuple(t.shape))
    _check_index_args(B, slot_table, slot_rows, ctx_lens)
    floats = (q, k_pool, v_pool, block_k, block_v)
    if any(not t.is_floating_point() for t in floats):
        _fail("q/k_pool/v_pool/block_k/block_v", "floating-point tensors", [t.dtype for t in floats])
    devices = {t.device for t in (*floats, slot_table, slot_rows, ctx_lens)}
    if len(devices) != 1:
        _fail("tensors", "all on one device", sorted(map(str, devices)))
    if q.device.type == "cpu":
        _check_index_values(slot_table, slot_rows, ctx_lens, k_pool.shape[0])


def _check_index_values(slot_table, slot_rows, ctx_lens, num_slots: int) -> None:
    R, S = slot_table.shape
    if slot_rows.numel() and (slot_rows.min() < 0 or slot_rows.max() >= R):
        _fail("slot_rows", f"rows in 0..{R - 1} of slot_table", slot_rows.tolist())
    if ctx_lens.numel() and (ctx_lens.min() < 0 or ctx_lens.max() > S):
        _fail("ctx_lens", f"values in 0..{S} (the width of slot_table)", ctx_lens.tolist())
    used = torch.arange(S)[None, :] < ctx_lens[:, None].long()
    slots = slot_table[slot_rows.long()][used]
    if slots.numel() and (slots.min() < 0 or slots.max() >= num_slots):
        _fail("slot_table", f"slots in 0..{num_slots - 1} within ctx_lens",
              f"range {int(slots.min())}..{int(slots.max())}")


def _fold(q, k, v, keep, scale, state):
    """Fold keys k / values v [B, n, Hkv, D] (``keep`` [B, n] marks real ones, None: all)
    into the running state (max, sum, weighted values) of queries q [B, L, Hkv, G, D]."""
    s = torch.einsum("blhgd,bnhd->bhgln", q, k) * scale  # [B, Hkv, G, L, n]
    if keep is not None:
        s = s.masked_fill(~keep[:, None, None, None, :], float("-inf"))
    m = s.amax(dim=-1) if state is None else torch.maximum(state[0], s.amax(dim=-1))
    p = torch.exp(s - m[..., None])
    pv = torch.einsum("bhgln,bnhd->bhgld", p, v)
    if state is None:
        return m, p.sum(dim=-1), pv
    alpha = torch.exp(state[0] - m)
    return m, state[1] * alpha + p.sum(dim=-1), state[2] * alpha[..., None] + pv


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
    check_draft_attention_args(q, k_pool, v_pool, slot_table, slot_rows, ctx_lens, block_k, block_v,
                               k_scale, v_scale)
    B, L, Hq, D = q.shape
    Hkv, S = k_pool.shape[1], slot_table.shape[1]
    qf = q.float().view(B, L, Hkv, Hq // Hkv, D)  # GQA: query head h * G + g reads KV head h
    # the block's own keys first: every row then has a finite running max
    state = _fold(qf, block_k.float(), block_v.float(), None, scale, None)
    rows = slot_rows.long()[:, None]
    # [Hkv, 1] per-head factors of the pool's entries
    k_mul = 1.0 if k_scale is None else k_scale[:, None]
    v_mul = 1.0 if v_scale is None else v_scale[:, None]
    for c0 in range(0, S, _CHUNK):
        cols = torch.arange(c0, min(c0 + _CHUNK, S), device=q.device)
        used = cols[None, :] < ctx_lens[:, None].long()  # [B, n]
        # columns past ctx_lens may hold anything: read slot 0 there, then mask keys and zero values
        slots = torch.where(used, slot_table[rows, cols[None, :]].long(), 0)
        v = torch.where(used[:, :, None, None], v_pool[slots].float() * v_mul, 0.0)
        state = _fold(qf, k_pool[slots].float() * k_mul, v, used, scale, state)
    _, den, acc = state
    out = (acc / den[..., None]).permute(0, 3, 1, 2, 4).reshape(B, L, Hq, D)
    return out.to(q.dtype)
