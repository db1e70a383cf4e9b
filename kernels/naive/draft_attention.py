"""Draft attention in plain torch: block queries over paged context K/V plus the block's own.

Request ``b`` attends, non-causally, to the keys of its context positions
``0..ctx_lens[b]-1`` (stored in the pool at ``slot_table[b, t]``) followed by the ``L``
keys of its own block. Scores and softmax in fp32; the output takes the dtype of ``q``.
Differentiable (the reference training script runs through it).
"""

from __future__ import annotations

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"draft_attention: argument `{name}`: expected {expected}, got {got}")


def check_draft_attention_args(q, k_pool, v_pool, slot_table, ctx_lens, block_k, block_v) -> None:
    """Shapes, dtypes and devices shared by the twin and the kernel; index values only
    on CPU (checking them on a GPU would cost a device sync every call)."""
    if q.ndim != 4:
        _fail("q", "[B, L, Hq, D]", tuple(q.shape))
    B, L, Hq, D = q.shape
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if t.ndim != 3 or t.shape[2] != D:
            _fail(name, f"[N, Hkv, {D}]", tuple(t.shape))
    if v_pool.shape != k_pool.shape:
        _fail("v_pool", f"the shape of k_pool {tuple(k_pool.shape)}", tuple(v_pool.shape))
    Hkv = k_pool.shape[1]
    if Hkv == 0 or Hq % Hkv:
        _fail("k_pool", f"a KV head count dividing Hq={Hq}", Hkv)
    for name, t in (("block_k", block_k), ("block_v", block_v)):
        if tuple(t.shape) != (B, L, Hkv, D):
            _fail(name, f"[B, L, Hkv, D] = {(B, L, Hkv, D)}", tuple(t.shape))
    if slot_table.ndim != 2 or slot_table.shape[0] != B or slot_table.dtype not in _INDEX_DTYPES:
        _fail("slot_table", f"[{B}, S] int32/int64", f"{tuple(slot_table.shape)} {slot_table.dtype}")
    if tuple(ctx_lens.shape) != (B,) or ctx_lens.dtype not in _INDEX_DTYPES:
        _fail("ctx_lens", f"[{B}] int32/int64", f"{tuple(ctx_lens.shape)} {ctx_lens.dtype}")
    floats = (q, k_pool, v_pool, block_k, block_v)
    if any(not t.is_floating_point() for t in floats):
        _fail("q/k_pool/v_pool/block_k/block_v", "floating-point tensors", [t.dtype for t in floats])
    devices = {t.device for t in (*floats, slot_table, ctx_lens)}
    if len(devices) != 1:
        _fail("tensors", "all on one device", sorted(map(str, devices)))
    if q.device.type == "cpu":
        _check_index_values(slot_table, ctx_lens, k_pool.shape[0])


def _check_index_values(slot_table, ctx_lens, num_slots: int) -> None:
    S = slot_table.shape[1]
    if ctx_lens.numel() and (ctx_lens.min() < 0 or ctx_lens.max() > S):
        _fail("ctx_lens", f"values in 0..{S} (the width of slot_table)", ctx_lens.tolist())
    used = torch.arange(S)[None, :] < ctx_lens[:, None].long()
    slots = slot_table[used]
    if slots.numel() and (slots.min() < 0 or slots.max() >= num_slots):
        _fail("slot_table", f"slots in 0..{num_slots - 1} within ctx_lens",
              f"range {int(slots.min())}..{int(slots.max())}")


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
    check_draft_attention_args(q, k_pool, v_pool, slot_table, ctx_lens, block_k, block_v)
    B, L, Hq, D = q.shape
    Hkv, S = k_pool.shape[1], slot_table.shape[1]
    used = torch.arange(S, device=q.device)[None, :] < ctx_lens[:, None].long()  # [B, S]
    # columns past ctx_lens may hold anything: read slot 0 there, then mask keys and zero values
    slots = torch.where(used, slot_table.long(), 0)
    k = torch.cat([k_pool[slots], block_k], dim=1).float()  # [B, S+L, Hkv, D]
    v = torch.cat([v_pool[slots], block_v], dim=1).float()
    keep = torch.cat([used, used.new_ones(B, L)], dim=1)    # [B, S+L]
    v = torch.where(keep[:, :, None, None], v, 0.0)
    # GQA: query head h reads KV head h // (Hq // Hkv)
    k = k.repeat_interleave(Hq // Hkv, dim=2)
    v = v.repeat_interleave(Hq // Hkv, dim=2)
    scores = torch.einsum("blhd,bnhd->bhln", q.float(), k) * scale  # [B, Hq, L, S+L]
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = torch.einsum("bhln,bnhd->blhd", scores.softmax(dim=-1), v)
    return out.to(q.dtype)
