"""Greedy lm_head in plain torch: max logit and argmax token of each hidden row.

Logits are fp32 products of the inputs upcast to fp32, computed one vocabulary chunk at a
time so a full ``[M, V]`` fp32 logits tensor never exists. Ties go to the lowest id, within
a shard and across shards (``combine_shards``).
"""

from __future__ import annotations

import torch

# vocabulary rows per chunk: bounds the fp32 logits held at once to M x 8192
_CHUNK_V = 8192


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"greedy_head: argument `{name}`: expected {expected}, got {got}")


def check_greedy_head_args(hidden, weight, vocab_offset) -> None:
    if hidden.ndim != 2:
        _fail("hidden", "[M, H]", tuple(hidden.shape))
    M, H = hidden.shape
    if weight.ndim != 2 or weight.shape[1] != H or weight.shape[0] < 1:
        _fail("weight", f"[V_shard, {H}] with V_shard >= 1", tuple(weight.shape))
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        _fail("hidden/weight", "floating-point tensors", (hidden.dtype, weight.dtype))
    if hidden.device != weight.device:
        _fail("hidden/weight", "one device", (str(hidden.device), str(weight.device)))
    if isinstance(vocab_offset, bool) or not isinstance(vocab_offset, int) or vocab_offset < 0:
        _fail("vocab_offset", "an int >= 0 (global id of weight row 0)", repr(vocab_offset))


def greedy_head(
    hidden: torch.Tensor,  # [M, H] any float dtype
    weight: torch.Tensor,  # [V_shard, H] lm_head rows of this shard
    vocab_offset: int,     # global id of weight row 0 (tensor-parallel shard start)
) -> tuple[torch.Tensor, torch.Tensor]:  # max_logit [M] fp32, token [M] int64 (global id)
    check_greedy_head_args(hidden, weight, vocab_offset)
    M = hidden.shape[0]
    best = torch.full((M,), float("-inf"), dtype=torch.float32, device=hidden.device)
    token = torch.zeros((M,), dtype=torch.int64, device=hidden.device)
    h = hidden.float()
    for v0 in range(0, weight.shape[0], _CHUNK_V):
        logits = h @ weight[v0:v0 + _CHUNK_V].float().T  # [M, chunk]
        # argmax returns the first maximum; a later chunk wins only when strictly greater
        chunk_max, chunk_idx = logits.max(dim=1)
        better = chunk_max > best
        best = torch.where(better, chunk_max, best)
        token = torch.where(better, chunk_idx + v0, token)
    return best, token + vocab_offset


def check_combine_shards_args(maxes, tokens) -> None:
    if (maxes.ndim != 2 or maxes.shape[0] < 1 or tokens.shape != maxes.shape
            or maxes.dtype != torch.float32 or tokens.dtype != torch.int64):
        raise ValueError(f"combine_shards: expected maxes [R, M] float32 (R >= 1) and tokens [R, M] "
                         f"int64, got {tuple(maxes.shape)} {maxes.dtype} and {tuple(tokens.shape)} "
                         f"{tokens.dtype}")
    if maxes.device != tokens.device:
        raise ValueError(f"combine_shards: expected maxes and tokens on one device, got "
                         f"{maxes.device} and {tokens.device}")


def combine_shards(
    maxes: torch.Tensor,   # [R, M] fp32 max_logit of each vocabulary shard
    tokens: torch.Tensor,  # [R, M] int64 global token id of each shard's maximum
) -> torch.Tensor:         # [M] int64
    """The global greedy token from per-shard results: highest logit, ties to the lowest id."""
    check_combine_shards_args(maxes, tokens)
    top = maxes.max(dim=0, keepdim=True).values
    at_top = torch.where(maxes == top, tokens, torch.iinfo(torch.int64).max)
    return at_top.min(dim=0).values
