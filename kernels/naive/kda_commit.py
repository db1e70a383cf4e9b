"""Replay the accepted prefix of a verified block into the KDA state (pure-torch twin).

After a verify forward over a block of L tokens, request ``b`` keeps ``commit_len[b]`` of
them. Instead of storing L intermediate recurrent states, the verify pass records each
token's ``k, v, g, beta`` and the pre-conv inputs, and this op replays the kept steps on
the pre-verify state. Per head, with ``S`` the ``[K, V]`` fp32 state and step ``t``::

    S = S * exp(g_t)[:, None]
    S = S + beta_t * outer(k_t, v_t - k_t @ S)

and the short-conv window (the last ``W - 1`` pre-conv inputs, oldest first) becomes the
last ``W - 1`` columns of ``[old window | conv_inputs[:n]^T]``.

Bit-exactness invariant: every step is ``kda_step`` below on a ``[1, H, K, V]`` state, the
same function and shapes the reference target's verify recurrence runs, so on one device
this twin reproduces the verify pass's state after ``n`` tokens bit for bit. The Triton
kernel (``sglang_dflash.kernels.kda_commit``) matches this twin to fp32 rounding; the conv
window is pure data movement in both, hence bit-identical.
"""

import torch


def kda_step(
    S: torch.Tensor,     # [B, H, K, V] fp32
    k: torch.Tensor,     # [B, H, K] fp32
    v: torch.Tensor,     # [B, H, V] fp32
    g: torch.Tensor,     # [B, H, K] fp32 log-decay
    beta: torch.Tensor,  # [B, H] fp32
) -> torch.Tensor:
    """One delta-rule step with per-channel decay; returns the new state (no in-place)."""
    S = S * g.exp()[..., None]
    # k @ S as an explicit product-sum over K so that every caller reduces in one order
    u = v - (k[..., None] * S).sum(-2)
    return S + (beta[..., None] * k)[..., None] * u[..., None, :]


def check_kda_commit_args(state, conv_state, slot_ids, k, v, g, beta, conv_inputs, commit_len) -> None:
    """Shapes, dtypes and devices of a ``kda_commit`` call (values only on CPU, where
    checking them costs no device sync and an out-of-bounds index would go unnoticed)."""
    assert state.ndim == 4 and state.dtype == torch.float32, \
        f"state: expected [N, H, K, V] fp32, got {tuple(state.shape)} {state.dtype}"
    N, H, K, V = state.shape
    assert conv_state.ndim == 3 and conv_state.shape[0] == N, \
        f"conv_state: expected [N={N}, C, W-1], got {tuple(conv_state.shape)}"
    C = conv_state.shape[1]
    assert slot_ids.ndim == 1 and slot_ids.dtype in (torch.int32, torch.int64), \
        f"slot_ids: expected [B] int32/int64, got {tuple(slot_ids.shape)} {slot_ids.dtype}"
    B = slot_ids.shape[0]
    assert k.ndim == 4 and k.shape[0] == B and k.shape[2:] == (H, K), \
        f"k: expected [B={B}, L, H={H}, K={K}], got {tuple(k.shape)}"
    L = k.shape[1]
    assert v.shape == (B, L, H, V), f"v: expected {(B, L, H, V)}, got {tuple(v.shape)}"
    assert g.shape == (B, L, H, K) and g.dtype == torch.float32, \
        f"g: expected {(B, L, H, K)} fp32, got {tuple(g.shape)} {g.dtype}"
    assert beta.shape == (B, L, H), f"beta: expected {(B, L, H)}, got {tuple(beta.shape)}"
    assert conv_inputs.shape == (B, L, C), f"conv_inputs: expected {(B, L, C)}, got {tuple(conv_inputs.shape)}"
    # the window holds the inputs themselves: a dtype change would round them on the way
    assert conv_inputs.dtype == conv_state.dtype, \
        f"conv_inputs dtype {conv_inputs.dtype} != conv_state dtype {conv_state.dtype}"
    assert commit_len.shape == (B,) and commit_len.dtype in (torch.int32, torch.int64), \
        f"commit_len: expected [B={B}] int32/int64, got {tuple(commit_len.shape)} {commit_len.dtype}"
    tensors = dict(conv_state=conv_state, slot_ids=slot_ids, k=k, v=v, g=g, beta=beta,
                   conv_inputs=conv_inputs, commit_len=commit_len)
    for name, t in tensors.items():
        assert t.device == state.device, f"{name} is on {t.device}, state on {state.device}"
    if state.device.type == "cpu" and B:
        assert 0 <= int(slot_ids.min()) and int(slot_ids.max()) < N, \
            f"slot_ids: expected values in [0, {N}), got {slot_ids.tolist()}"
        assert slot_ids.unique().numel() == B, f"slot_ids: expected distinct slots, got {slot_ids.tolist()}"
        assert 0 <= int(commit_len.min()) and int(commit_len.max()) <= L, \
            f"commit_len: expected values in [0, {L}], got {commit_len.tolist()}"


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
    keep = conv_state.shape[2]
    for b, (slot, n) in enumerate(zip(slot_ids.tolist(), commit_len.tolist())):
        if n == 0:
            continue
        S = state[slot:slot + 1]
        for t in range(n):
            S = kda_step(S, k[b:b + 1, t].float(), v[b:b + 1, t].float(), g[b:b + 1, t],
                         beta[b:b + 1, t].float())
        state[slot] = S[0]
        # E.g. window [a, b, c] and inputs [d, e] -> [c, d, e]
        window = torch.cat([conv_state[slot], conv_inputs[b, :n].t()], dim=1)
        conv_state[slot] = window[:, window.shape[1] - keep:]
