"""Replay the accepted prefix of a verified block into the KDA state (Triton).

Same contract as the twin ``sglang_dflash.kernels.naive.kda_commit`` (read its docstring
for the recurrence). Two launches:

- ``_kda_replay_kernel``: one program per (request, head, V-tile) keeps a ``[K, BV]`` fp32
  tile of the state in registers and runs ``commit_len[b]`` steps over it. A step needs
  ``k @ S`` only along K, so V-tiles are independent.
- ``_conv_window_kernel``: one program per (request, channel block) rewrites that block of
  the short-conv window; it loads the whole old window before storing, so the in-place
  shift never reads a value it has already overwritten.

Bit-exactness invariant: the state matches the twin to fp32 rounding (``exp`` and the
K-reduction order differ); the conv window is pure data movement, bit-identical. Slots
outside ``slot_ids`` are never read or written.
"""

import torch
import triton
import triton.language as tl

from .naive.kda_commit import check_kda_commit_args


@triton.jit
def _kda_replay_kernel(
    state,       # [N, H, K, V] fp32
    slot_ids,    # [B]
    k,           # [B, L, H, K]
    v,           # [B, L, H, V]
    g,           # [B, L, H, K] fp32
    beta,        # [B, L, H]
    commit_len,  # [B]
    L, H, K, V,
    BK: tl.constexpr, BV: tl.constexpr,
):
    i_b, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.load(commit_len + i_b)
    i_n = tl.load(slot_ids + i_b).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    p_s = state + ((i_n * H + i_h) * K + o_k[:, None]) * V + o_v[None, :]
    b_s = tl.load(p_s, mask=m_s, other=0.0)
    for t in range(0, n):
        # row (b, t, h) of the [B, L, H, *] inputs, in int64: B * L * H * K can pass 2**31
        i_row = (i_b.to(tl.int64) * L + tl.cast(t, tl.int64)) * H + i_h
        b_k = tl.load(k + i_row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + i_row * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_g = tl.load(g + i_row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + i_row).to(tl.float32)
        b_s = b_s * tl.exp(b_g)[:, None]
        b_u = b_v - tl.sum(b_k[:, None] * b_s, axis=0)
        b_s = b_s + (b_beta * b_k)[:, None] * b_u[None, :]
    tl.store(p_s, b_s, mask=m_s)


@triton.jit
def _conv_window_kernel(
    conv_state,   # [N, C, W1]
    slot_ids,     # [B]
    conv_inputs,  # [B, L, C]
    commit_len,   # [B]
    L, C, W1,
    BC: tl.constexpr, BW: tl.constexpr,
):
    i_b, i_c = tl.program_id(0), tl.program_id(1)
    n = tl.load(commit_len + i_b)
    i_n = tl.load(slot_ids + i_b).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    o_w = tl.arange(0, BW)
    m_c, m_w = o_c < C, o_w < W1
    # new column j is column n + j of [old window (W1 columns) | inputs (n columns)]
    o_src = o_w + n
    from_old = o_src < W1
    m_old = m_c[:, None] & (m_w & from_old)[None, :]
    m_new = m_c[:, None] & (m_w & (o_src >= W1))[None, :]
    p_win = conv_state + (i_n * C + o_c[:, None]) * W1 + o_w[None, :]
    b_old = tl.load(conv_state + (i_n * C + o_c[:, None]) * W1 + o_src[None, :], mask=m_old, other=0.0)
    i_t = tl.where(from_old, 0, o_src - W1).to(tl.int64)
    b_new = tl.load(conv_inputs + (i_b.to(tl.int64) * L + i_t[None, :]) * C + o_c[:, None],
                    mask=m_new, other=0.0)
    b_win = tl.where(from_old[None, :], b_old, b_new)
    tl.store(p_win, b_win, mask=m_c[:, None] & m_w[None, :])


def kda_commit(
    state: torch.Tensor,        # [N, H, K, V] fp32 pool, updated in place for slot_ids
    conv_state: torch.Tensor,   # [N, C, W-1] pool, updated in place for slot_ids
    slot_ids: torch.Tensor,     # [B] int32/int64, distinct
    k: torch.Tensor,            # [B, L, H, K] post conv/silu/l2norm
    v: torch.Tensor,            # [B, L, H, V]
    g: torch.Tensor,            # [B, L, H, K] fp32 log-decay
    beta: torch.Tensor,         # [B, L, H]
    conv_inputs: torch.Tensor,  # [B, L, C] pre-conv inputs of the block
    commit_len: torch.Tensor,   # [B] int, 0..L
) -> None:
    """Advance ``state[slot_ids[b]]`` and ``conv_state[slot_ids[b]]`` by the first
    ``commit_len[b]`` tokens of the block; other slots are never touched."""
    check_kda_commit_args(state, conv_state, slot_ids, k, v, g, beta, conv_inputs, commit_len)
    # the pools are written in place, so they cannot be silently copied
    assert state.is_contiguous() and conv_state.is_contiguous(), "state and conv_state must be contiguous"
    B, L, H, K = k.shape
    V, (C, W1) = v.shape[3], conv_state.shape[1:]
    if B == 0:
        return
    k, v, g, beta, conv_inputs = (t.contiguous() for t in (k, v, g, beta, conv_inputs))
    slot_ids, commit_len = slot_ids.contiguous(), commit_len.contiguous()
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), 32)
    _kda_replay_kernel[(B, H, triton.cdiv(V, BV))](
        state, slot_ids, k, v, g, beta, commit_len, L, H, K, V, BK=BK, BV=BV)
    if W1 == 0:
        return
    BC = min(triton.next_power_of_2(C), 128)
    _conv_window_kernel[(B, triton.cdiv(C, BC))](
        conv_state, slot_ids, conv_inputs, commit_len, L, C, W1, BC=BC, BW=triton.next_power_of_2(W1))
