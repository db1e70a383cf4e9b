"""Greedy lm_head (Triton): logits tile by tile, only each tile's maximum leaves the chip.

Pass 1, one program per (row tile, vocabulary tile): ``[BLOCK_M, BLOCK_V]`` logits
accumulate in fp32 over the hidden dim, and the tile writes its maximum and the lowest
row id holding it. Programs of one vocabulary tile are launched next to each other, so
its weight rows are read from HBM about once and served to the other row tiles from L2;
``tile_config`` switches to GEMM-sized tiles above 64 rows so that L2 serves them few times.
Pass 2, one program per row: the first tile holding the row's maximum gives the token.
Both passes break ties toward the lowest id, so the result equals ``argmax`` of the full
logits (which returns the first maximum). A caller with vocabulary shards gathers every
rank's ``(max_logit, token)`` and combines them with ``combine_shards`` (highest logit,
then lowest id), one program per tile of rows.

Two tiny passes instead of atomics on packed (logit, id) keys: the partials are
``M x V/BLOCK_V`` fp32 + int32 (about 5 MiB at M = 960, V = 163840), cheap next to the
weight, and the result is deterministic without float-to-int key tricks.

Same tokens as the twin ``sglang_dflash.kernels.naive.greedy_head`` up to fp32 summation
order: fp32 (or mixed-dtype, or CPU) inputs are upcast and use IEEE fp32 dots; bf16/fp16
inputs on a GPU use tensor-core dots, whose products are exact in fp32 as well.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive.greedy_head import check_combine_shards_args, check_greedy_head_args

__all__ = ["greedy_head", "combine_shards"]

_BLOCK_K = 64


@triton.jit
def _first_max(b_x, b_id, axis: tl.constexpr):
    """Maximum of b_x along axis and the lowest b_id (int32) where it occurs."""
    b_max = tl.max(b_x, axis=axis)
    if axis == 1:
        at_max = b_x == b_max[:, None]
    else:
        at_max = b_x == b_max
    return b_max, tl.min(tl.where(at_max, b_id, 2147483647), axis=axis)


@triton.jit
def _tile_max_kernel(
    hidden,    # [M, H]
    weight,    # [V, H]
    part_max,  # [M, NT] fp32
    part_id,   # [M, NT] int32 (shard-local row id)
    M, V, H, NT, s_hm, s_wv,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    i_m, i_v = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    o_k = tl.arange(0, BLOCK_K)
    m_m, m_v = o_m < M, o_v < V
    p_h = hidden + o_m[:, None].to(tl.int64) * s_hm + o_k[None, :]
    p_w = weight + o_v[:, None].to(tl.int64) * s_wv + o_k[None, :]
    b_acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        m_k = k0 + o_k < H
        b_h = tl.load(p_h + k0, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        b_w = tl.load(p_w + k0, mask=m_v[:, None] & m_k[None, :], other=0.0)  # [BV, BK]
        if UPCAST:
            b_acc = tl.dot(b_h.to(tl.float32), tl.trans(b_w.to(tl.float32)), b_acc,
                           input_precision="ieee")
        else:
            b_acc = tl.dot(b_h, tl.trans(b_w), b_acc)
    b_acc = tl.where(m_v[None, :], b_acc, float("-inf"))
    b_max, b_id = _first_max(b_acc, o_v[None, :], 1)
    off = o_m.to(tl.int64) * NT + i_v
    tl.store(part_max + off, b_max, mask=m_m)
    tl.store(part_id + off, b_id, mask=m_m)


@triton.jit
def _reduce_tiles_kernel(
    part_max,   # [M, NT] fp32
    part_id,    # [M, NT] int32
    max_logit,  # [M] fp32
    token,      # [M] int64
    NT, vocab_offset,
    BLOCK_T: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    o_t = tl.arange(0, BLOCK_T)
    b_max = tl.load(part_max + i_m * NT + o_t, mask=o_t < NT, other=float("-inf"))
    row_max, first_tile = _first_max(b_max, o_t, 0)
    # tiles are in increasing id order: the first tile at the maximum has the lowest id
    b_id = tl.load(part_id + i_m * NT + first_tile)
    tl.store(max_logit + i_m, row_max)
    tl.store(token + i_m, b_id.to(tl.int64) + vocab_offset)


def _check_layout(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"greedy_head: argument `{name}`: expected a contiguous last dim, "
                             f"got strides {tuple(t.stride())}")
    # pass 2 holds one row of tile maxima in registers: 2**23 rows are 65536 tiles
    if weight.shape[0] > 2**23:
        raise ValueError(f"greedy_head: argument `weight`: expected at most 2**23 vocabulary rows, "
                         f"got {weight.shape[0]}")


def tile_config(M: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_V, num_warps) of pass 1 for M hidden rows.

    Pass 1 is a GEMM [M, H] x [H, V]; each tile reads a [BLOCK_M, H] slice of the hidden
    rows and a [BLOCK_V, H] slice of the lm_head, so on-chip (L2 -> SM) traffic is
    ``2 H M' V (1 / BLOCK_V + 1 / BLOCK_M)`` bytes in bf16 (M' = M rounded up to row
    tiles), and the lm_head passes through L2 once per row tile; HBM reads it once,
    since the row tiles of one vocabulary tile run side by side. Up to 64 rows one
    small row tile holds them all. Above that the kernel switches to a GEMM-sized
    256 x 128 tile on 8 warps (the largest without spills on sm_90 and sm_100, see
    benchmarks/compile_check.py): at V = 163840, H = 2304 and block 16, B = 32 / 64
    (M = 480 / 960) move 4.5 / 9.1 GB on chip with the lm_head passing L2 2 / 4 times,
    instead of 9.1 / 17.0 GB and 8 / 15 times with 64 x 128 tiles.
    """
    if M > 64:
        return 256, 128, 8
    return max(16, triton.next_power_of_2(M)), 128, 4


def greedy_head(
    hidden: torch.Tensor,  # [M, H] any float dtype
    weight: torch.Tensor,  # [V_shard, H] lm_head rows of this shard
    vocab_offset: int,     # global id of weight row 0 (tensor-parallel shard start)
) -> tuple[torch.Tensor, torch.Tensor]:  # max_logit [M] fp32, token [M] int64 (global id)
    check_greedy_head_args(hidden, weight, vocab_offset)
    _check_layout(hidden, weight)
    (M, H), V = hidden.shape, weight.shape[0]
    max_logit = torch.empty(M, dtype=torch.float32, device=hidden.device)
    token = torch.empty(M, dtype=torch.int64, device=hidden.device)
    if M == 0:
        return max_logit, token
    BLOCK_M, BLOCK_V, num_warps = tile_config(M)
    NT = triton.cdiv(V, BLOCK_V)
    part_max = torch.empty(M, NT, dtype=torch.float32, device=hidden.device)
    part_id = torch.empty(M, NT, dtype=torch.int32, device=hidden.device)
    # the interpreter has no bf16 arithmetic, and fp32 or mixed inputs need IEEE fp32 dots
    upcast = hidden.device.type == "cpu" or hidden.dtype != weight.dtype or hidden.dtype == torch.float32
    _tile_max_kernel[(triton.cdiv(M, BLOCK_M), NT)](
        hidden, weight, part_max, part_id, M, V, H, NT, hidden.stride(0), weight.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_V=BLOCK_V, BLOCK_K=_BLOCK_K, UPCAST=upcast,
        num_warps=num_warps, num_stages=3,
    )
    _reduce_tiles_kernel[(M,)](
        part_max, part_id, max_logit, token, NT, vocab_offset,
        BLOCK_T=triton.next_power_of_2(NT), num_warps=4,
    )
    return max_logit, token


@triton.jit
def _combine_shards_kernel(
    maxes,   # [R, M] fp32
    tokens,  # [R, M] int64
    out,     # [M] int64
    R, M,
    BLOCK: tl.constexpr,
):
    o_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_m = o_m < M
    b_best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    b_token = tl.full([BLOCK], 2**62, dtype=tl.int64)
    for r in range(0, R):
        b_x = tl.load(maxes + r * M + o_m, mask=m_m, other=float("-inf"))
        b_t = tl.load(tokens + r * M + o_m, mask=m_m, other=0)
        better = (b_x > b_best) | ((b_x == b_best) & (b_t < b_token))
        b_best = tl.where(better, b_x, b_best)
        b_token = tl.where(better, b_t, b_token)
    tl.store(out + o_m, b_token, mask=m_m)


def combine_shards(
    maxes: torch.Tensor,   # [R, M] fp32 max_logit of each vocabulary shard
    tokens: torch.Tensor,  # [R, M] int64 global token id of each shard's maximum
) -> torch.Tensor:         # [M] int64
    """The global greedy token from per-shard results: highest logit, ties to the lowest id."""
    check_combine_shards_args(maxes, tokens)
    R, M = maxes.shape
    out = torch.empty(M, dtype=torch.int64, device=maxes.device)
    if M == 0:
        return out
    BLOCK = 256
    _combine_shards_kernel[(triton.cdiv(M, BLOCK),)](
        maxes.contiguous(), tokens.contiguous(), out, R, M, BLOCK=BLOCK, num_warps=4)
    return out
