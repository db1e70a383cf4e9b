"""The tensor steps of the DFlash worker, free of SGLang objects.

Each function takes plain tensors (device from the inputs) and returns plain tensors, so
the tests drive them with real SGLang pools and batch fields and compare them with the
reference loop (``reference/loop.py``), which is the specification of the step:

  block inputs   block = [bonus, MASK x (L-1)] at positions seq_len .. seq_len+L-1 (L the
                 drafter's block), and the KV slots SGLang reserved for the first W of
                 them, the positions the target verifies (``req_to_token``); the draft
                 reads its context straight from the request's ``req_to_token`` row
                 (``draft_graph``)
  accept         greedy rows through ``accept_greedy``, sampled rows through
                 ``accept_sampled``; probabilities as SGLang's sampler defines them
                 (``sglang_dflash.sampling``, for the server's sampling backend)
  outputs        what the scheduler reads back: emitted tokens, ``accept_lens``
                 (= ``commit_len``), the next bonus and the next ``seq_lens``

Stop conditions (EOS, stop ids, ``max_new_tokens``) are not applied here: SGLang's
scheduler trims each request's accepted run in ``Req.update_finish_state``, so the ops
run with no stop ids and an unlimited budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backend import Ops
from ..sampling import RowSampling, target_probs


def extend_positions(prefix_lens: list[int], extend_lens: list[int], device) -> torch.Tensor:
    """[T] absolute positions of an extend batch's new tokens, requests back to back,
    computed from the host lists and sent to the device without a blocking copy.

    E.g. prefix_lens [0, 5], extend_lens [3, 2] -> [0, 1, 2, 5, 6].
    """
    if len(prefix_lens) != len(extend_lens):
        raise ValueError(f"prefix_lens has {len(prefix_lens)} entries but extend_lens has {len(extend_lens)}")
    starts = torch.tensor(prefix_lens, dtype=torch.int64)
    counts = torch.tensor(extend_lens, dtype=torch.int64)
    if (counts < 0).any() or (starts < 0).any():
        raise ValueError(f"negative prefix or extend length: {prefix_lens}, {extend_lens}")
    first = torch.cumsum(counts, 0) - counts  # index of each request's first new token
    offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)
    positions = torch.repeat_interleave(starts, counts) + offsets
    if torch.device(device).type != "cuda":
        return positions.to(device)
    # from pinned memory the copy is queued on the stream without blocking the host (the
    # caching host allocator keeps the staging buffer until the copy has run)
    return positions.pin_memory().to(device, non_blocking=True)


def block_inputs(
    bonus: torch.Tensor,  # [B] last committed token of each request
    seq_lens: torch.Tensor,  # [B] committed lengths = position of the bonus token
    req_pool_indices: torch.Tensor,  # [B] rows of req_to_token
    req_to_token: torch.Tensor,  # [R, C] KV slot of each (request row, position)
    mask_token_id: int,
    block_size: int,
    verify_width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """block_ids [B, L], positions [B, L], cache_loc [B, W] of one draft block of L whose
    first W positions the target verifies.

    cache_loc are the slots SGLang reserved for the verified positions (it keeps 2W slots
    per request allocated ahead of ``seq_lens``); the target's verify and the draft
    context both write there. The drafted positions past W get no slot: the draft keeps
    no K/V of its block.
    """
    B, L, W = bonus.shape[0], block_size, verify_width
    if not 2 <= W <= L:
        raise ValueError(f"verify width {W} must lie in 2..{L} (the draft block)")
    if seq_lens.shape != (B,) or req_pool_indices.shape != (B,):
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} and req_pool_indices "
                         f"{tuple(req_pool_indices.shape)} must both be ({B},) like bonus")
    block_ids = torch.full((B, L), mask_token_id, dtype=torch.int64, device=bonus.device)
    block_ids[:, 0] = bonus
    positions = seq_lens.to(torch.int64)[:, None] + torch.arange(L, device=bonus.device)[None, :]
    rows = req_pool_indices.to(torch.int64)[:, None]
    cache_loc = req_to_token[rows, positions[:, :W]].to(torch.int64)
    return block_ids, positions, cache_loc


def accept_block(
    ops: Ops,
    candidates: torch.Tensor,  # [B, L]
    logits: torch.Tensor,  # [B, L, V] target logits after each candidate
    sampling: RowSampling | None,  # [B] rows; None: every row is greedy
    greedy_rows: torch.Tensor | None,  # [B] bool, needed when some rows sample
    sampling_backend: str = "pytorch",  # --sampling-backend, whose filters define p
) -> tuple[torch.Tensor, torch.Tensor]:
    """accept_len [B] int64, emitted [B, L] int64 (-1 past commit_len).

    A batch mixing greedy and sampled rows runs both kernels on all rows and picks per
    row, so no row list has to come back from the device.
    """
    B, L = candidates.shape
    if logits.shape[:2] != (B, L):
        raise ValueError(f"logits {tuple(logits.shape)} do not match candidates {tuple(candidates.shape)}")
    device = candidates.device
    # the scheduler applies stops and max_new_tokens; the ops get no stop ids, no cap
    remaining = torch.full((B,), L, dtype=torch.int64, device=device)
    stops = torch.empty((B, 0), dtype=torch.int64, device=device)
    if sampling is None:
        accept_len, emitted, _ = ops.accept_greedy(candidates, logits.argmax(dim=-1), remaining, stops)
        return accept_len.to(torch.int64), emitted.to(torch.int64)

    V = logits.shape[-1]
    probs = target_probs(logits.reshape(B * L, V), sampling.repeat_rows(L), sampling_backend).view(B, L, V)
    u_accept = torch.rand((B, L), dtype=torch.float32, device=device)
    u_sample = torch.rand((B,), dtype=torch.float32, device=device)
    accept_len, emitted, _ = ops.accept_sampled(candidates, probs, u_accept, u_sample, remaining, stops)
    accept_len, emitted = accept_len.to(torch.int64), emitted.to(torch.int64)
    if greedy_rows is None:
        return accept_len, emitted
    g_len, g_emitted, _ = ops.accept_greedy(candidates, logits.argmax(dim=-1), remaining, stops)
    accept_len = torch.where(greedy_rows, g_len.to(torch.int64), accept_len)
    emitted = torch.where(greedy_rows[:, None], g_emitted.to(torch.int64), emitted)
    return accept_len, emitted


@dataclass(frozen=True)
class SpecOutputs:
    """One verify step as SGLang's scheduler reads it back."""

    next_token_ids: torch.Tensor  # [B * L] int64; row b's first commit_len[b] are its tokens
    commit_lens: torch.Tensor  # [B] int32, SGLang's ``accept_lens`` (bonus included)
    bonus: torch.Tensor  # [B] int64, the next block's column 0
    new_seq_lens: torch.Tensor  # [B] int64


def spec_outputs(
    accept_len: torch.Tensor,  # [B]
    emitted: torch.Tensor,  # [B, L], -1 past commit_len
    seq_lens: torch.Tensor,  # [B] committed lengths before the step
) -> SpecOutputs:
    """E.g. accept_len [2, 0], emitted [[7, 8, 9, -1], [5, -1, -1, -1]], seq_lens [10, 4]
    -> next_token_ids [7, 8, 9, 0, 5, 0, 0, 0], commit_lens [3, 1], bonus [9, 5],
    new_seq_lens [13, 5]."""
    accept_len = accept_len.to(torch.int64)
    bonus = emitted.gather(1, accept_len[:, None]).squeeze(1).to(torch.int64)
    # consumers that gather by token id (logprobs) also read the padding: keep it in range
    next_token_ids = emitted.clamp_min(0).to(torch.int64).reshape(-1)
    commit_lens = (accept_len + 1).to(torch.int32)
    new_seq_lens = seq_lens.to(torch.int64) + accept_len + 1
    return SpecOutputs(next_token_ids, commit_lens, bonus, new_seq_lens)


def mamba_steps_to_track(
    seq_lens_pre: torch.Tensor,  # [B] before the verify
    seq_lens_post: torch.Tensor,  # [B] after the commit
    commit_lens: torch.Tensor,  # [B]
    interval: int,
) -> torch.Tensor:
    """[B] int64: block step whose linear-attention state the radix cache keeps, or -1.

    With mamba radix tracking, SGLang checkpoints a request's state each time its length
    crosses a multiple of ``interval``; the state after position p is the verify step
    p - seq_len_pre. E.g. interval 8, pre 6, commit 4 (post 10): the crossing at 8 is
    the state after position 7 = step 1. A crossing past the committed steps is skipped.
    """
    crosses = seq_lens_pre // interval != seq_lens_post // interval
    boundary = seq_lens_post // interval * interval
    step = torch.clamp(boundary - seq_lens_pre - 1, min=0)
    keep = crosses & (step < commit_lens.to(step.dtype))
    return torch.where(keep, step, torch.full_like(step, -1)).to(torch.int64)
