"""Acceptance of a verified block, in plain torch: greedy and sampled (lossless) rules.

Both ops first build the step's token chain ``tokens [B, L]`` and its length ``n = a + 1``
(``a`` accepted drafts, then the bonus), then apply the request's stop conditions:
the chain is cut right after its first stop id and to at most ``remaining`` tokens.

Sampled acceptance draws from a probability row by an inverse CDF in fixed point:
``q_i = trunc(p_i * 2**40)`` (int64), ``t = trunc(float64(u) * float64(sum q))`` and the
token is the smallest ``i`` with ``cumsum(q)[i] > t``. Integer sums do not depend on the
summation order, so the Triton kernel, which scans the vocabulary in tiles, picks the
same token bit for bit. The quantisation drops at most ``V * 2**-40`` of probability mass
(1.5e-7 at V = 163840), below the 2**-24 resolution of fp32 uniforms.
"""

from __future__ import annotations

import torch

# fixed-point scale of the inverse CDF: 2**40 keeps sums of a normalised row far from
# int64 overflow and per-token truncation (2**-40) far below fp32 uniform resolution
CDF_SCALE = float(2**40)


def _fail(op: str, name: str, expected: str, got) -> None:
    raise ValueError(f"{op}: argument `{name}`: expected {expected}, got {got}")


def _check_int64(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != shape or t.dtype != torch.int64:
        dims = ", ".join(map(str, shape))
        _fail(op, name, f"[{dims}] int64", f"{tuple(t.shape)} {t.dtype}")


def check_block_args(op: str, candidates, remaining, stop_ids, others) -> None:
    """Shapes, dtypes and devices common to both ops; values only on CPU (checking them
    on a GPU would cost a device sync every call)."""
    if candidates.ndim != 2 or candidates.shape[1] < 1:
        _fail(op, "candidates", "[B, L] with L >= 1", tuple(candidates.shape))
    B, L = candidates.shape
    _check_int64(op, "candidates", candidates, (B, L))
    _check_int64(op, "remaining", remaining, (B,))
    if stop_ids.ndim != 2 or stop_ids.shape[0] != B:
        _fail(op, "stop_ids", f"[{B}, E] int64", f"{tuple(stop_ids.shape)} {stop_ids.dtype}")
    _check_int64(op, "stop_ids", stop_ids, (B, stop_ids.shape[1]))
    devices = {t.device for t in (candidates, remaining, stop_ids, *others)}
    if len(devices) != 1:
        _fail(op, "tensors", "all on one device", sorted(map(str, devices)))
    if candidates.device.type == "cpu" and B and remaining.min() < 1:
        _fail(op, "remaining", "values >= 1 (tokens the request may still emit)", remaining.tolist())


def check_accept_greedy_args(candidates, target_predict, remaining, stop_ids) -> None:
    op = "accept_greedy"
    check_block_args(op, candidates, remaining, stop_ids, (target_predict,))
    _check_int64(op, "target_predict", target_predict, tuple(candidates.shape))


def check_accept_sampled_args(candidates, probs, u_accept, u_sample, remaining, stop_ids) -> None:
    op = "accept_sampled"
    check_block_args(op, candidates, remaining, stop_ids, (probs, u_accept, u_sample))
    B, L = candidates.shape
    if probs.ndim != 3 or tuple(probs.shape[:2]) != (B, L) or probs.shape[2] < 1:
        _fail(op, "probs", f"[{B}, {L}, V] float32 with V >= 1", tuple(probs.shape))
    if probs.dtype != torch.float32:
        _fail(op, "probs", "float32", probs.dtype)
    for name, t, shape in (("u_accept", u_accept, (B, L)), ("u_sample", u_sample, (B,))):
        if tuple(t.shape) != shape or t.dtype != torch.float32:
            _fail(op, name, f"{list(shape)} float32", f"{tuple(t.shape)} {t.dtype}")
    if candidates.device.type != "cpu" or B == 0:
        return
    V = probs.shape[2]
    if candidates[:, 1:].numel() and (candidates[:, 1:].min() < 0 or candidates[:, 1:].max() >= V):
        _fail(op, "candidates", f"drafts (columns 1..) in 0..{V - 1}",
              f"range {int(candidates[:, 1:].min())}..{int(candidates[:, 1:].max())}")
    for name, t in (("u_accept", u_accept), ("u_sample", u_sample)):
        if not ((t >= 0) & (t < 1)).all():
            _fail(op, name, "uniforms in [0, 1)", f"range {float(t.min())}..{float(t.max())}")
    if not ((probs >= 0) & (probs <= 1)).all():
        _fail(op, "probs", "probabilities in [0, 1] (no NaN)", "values outside")


def finish_block(
    tokens: torch.Tensor,     # [B, L] int64 the step's chain; only the first n are meaningful
    n: torch.Tensor,          # [B] int64 in 1..L: chain length before stop conditions (a + 1)
    remaining: torch.Tensor,  # [B] int64 >= 1
    stop_ids: torch.Tensor,   # [B, E] int64, -1 unused
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # accept_len [B], emitted [B, L], finished [B]
    """Cut the chain after its first stop id and to ``remaining`` tokens."""
    B, L = tokens.shape
    cols = torch.arange(L, device=tokens.device)[None, :]  # [1, L]
    in_chain = cols < n[:, None]
    # E.g. tokens [7, 2, 9], stop_ids [2, -1] -> is_stop [F, T, F]
    hits = (tokens[:, :, None] == stop_ids[:, None, :]) & (stop_ids[:, None, :] >= 0)  # [B, L, E]
    is_stop = hits.any(dim=2) & in_chain
    first_stop = torch.where(is_stop, cols, L).min(dim=1).values  # [B], L when none
    commit_len = torch.minimum(torch.minimum(n, first_stop + 1), remaining)
    finished = (first_stop < commit_len) | (commit_len == remaining)
    emitted = torch.where(cols < commit_len[:, None], tokens, -1)
    return commit_len - 1, emitted, finished


def accept_greedy(
    candidates: torch.Tensor,      # [B, L] int64; col 0 = last committed token, cols 1.. = drafts
    target_predict: torch.Tensor,  # [B, L] int64 target argmax for the position after each candidate
    remaining: torch.Tensor,       # [B] int64 >= 1: tokens the request may still emit
    stop_ids: torch.Tensor,        # [B, E] int64 stop ids per request, -1 = unused (E may be 0)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # accept_len [B], emitted [B, L], finished [B] bool
    check_accept_greedy_args(candidates, target_predict, remaining, stop_ids)
    # draft j+1 is accepted while every earlier draft was: a = length of the all-true prefix
    match = candidates[:, 1:] == target_predict[:, :-1]  # [B, L-1]
    a = match.long().cumprod(dim=1).sum(dim=1)
    # accepted drafts equal the target's tokens, so the chain is target_predict[:, :a+1]
    return finish_block(target_predict, a + 1, remaining, stop_ids)


def inverse_cdf_fixed_point(
    probs: torch.Tensor,    # [B, V] fp32, rows with some mass
    removed: torch.Tensor,  # [B] int64 token whose mass is dropped first, -1 for none
    u: torch.Tensor,        # [B] fp32 in [0, 1)
) -> torch.Tensor:          # [B] int64
    """Sample from ``probs`` without ``removed`` (renormalised) by the fixed-point rule of
    the module docstring; when the removed token held all the mass, nothing is removed."""
    V = probs.shape[1]
    q = (probs * CDF_SCALE).to(torch.int64)  # [B, V], truncation toward zero
    q_removed = torch.where(removed >= 0, q.gather(1, removed.clamp(min=0)[:, None])[:, 0], 0)
    total_all = q.sum(dim=1)
    keep_all = total_all == q_removed
    removed = torch.where(keep_all, -1, removed)
    total = torch.where(keep_all, total_all, total_all - q_removed)
    q = torch.where(torch.arange(V, device=q.device)[None, :] == removed[:, None], 0, q)
    t = (u.double() * total.double()).to(torch.int64)
    # u < 1 gives t < total, so the count is a token with mass; the clamp only guards
    # rows without any mass at all (invalid input)
    return (q.cumsum(dim=1) <= t[:, None]).sum(dim=1).clamp(max=V - 1)


def accept_sampled(
    candidates: torch.Tensor,  # [B, L] int64 (greedy drafts in cols 1..)
    probs: torch.Tensor,       # [B, L, V] fp32 target distribution for the position after each candidate
    u_accept: torch.Tensor,    # [B, L] fp32 uniforms in [0, 1); u_accept[b, j] decides draft j+1
    u_sample: torch.Tensor,    # [B] fp32 uniform in [0, 1) for the residual / bonus sample
    remaining: torch.Tensor,   # [B] int64 >= 1
    stop_ids: torch.Tensor,    # [B, E] int64, -1 = unused
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # accept_len [B], emitted [B, L], finished [B] bool
    check_accept_sampled_args(candidates, probs, u_accept, u_sample, remaining, stop_ids)
    B, L = candidates.shape
    drafts = candidates[:, 1:]  # [B, L-1]
    # a point-mass proposal on draft d is accepted with probability min(1, p(d)) = p(d)
    p_draft = probs[:, :-1].gather(2, drafts[:, :, None])[:, :, 0]  # [B, L-1]
    a = (u_accept[:, :-1] < p_draft).long().cumprod(dim=1).sum(dim=1)  # [B]
    rows = torch.arange(B, device=candidates.device)
    # rejected at position a: resample without the draft; all accepted: plain bonus sample
    removed = torch.where(a < L - 1, candidates[rows, (a + 1).clamp(max=L - 1)], -1)
    token = inverse_cdf_fixed_point(probs[rows, a], removed, u_sample)
    cols = torch.arange(L, device=candidates.device)[None, :]
    # E.g. L=4, a=1: candidates [c, d1, d2, d3] -> tokens [d1, token, ., .]
    chain = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1)
    tokens = torch.where(cols == a[:, None], token[:, None], chain)
    return finish_block(tokens, a + 1, remaining, stop_ids)
