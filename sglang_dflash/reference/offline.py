"""Offline (teacher-forced) acceptance, the metric DFlash drafters are published with.

1. Decode the target's own greedy continuation of each prompt.
2. Run the target once over prompt + continuation to get every position's features.
3. Walk blocks through the continuation: at block start s (token s already emitted),
   draft from the context features of positions < s, accept the longest prefix of drafts
   that equals the continuation, emit accept_len + 1 tokens (cut at the continuation's
   end), move s forward by that many. No verify forward runs: the continuation *is* what
   the target would predict, so online greedy decoding visits exactly the same blocks.

With a verify width W < L the drafter still drafts its block of L and only the first W-1
drafts can be accepted (commit_len <= W), as the online loop does with ``verify_width``;
"draft W, verify W" (what engines without a verify width do) is block_size = W.
"""

from __future__ import annotations

import torch

from ..acceptance import AcceptanceStats, acceptance_stats
from ..backend import Ops
from .loop import RequestResult, check_verify_width, draft_block, generate_plain
from .sampling import SamplingParams


def teacher_forced_commit_lens(target, drafter, ops: Ops, prompts: list[list[int]],
                               continuations: list[list[int]], block_size: int,
                               verify_width: int | None = None) -> list[list[int]]:
    """commit_len of every block walked through each (prompt, continuation) pair: blocks
    of ``block_size``, the first ``verify_width`` (default: all) positions verified."""
    L = block_size
    W = verify_width or L
    check_verify_width(W, L)
    target.set_capture_layers(drafter.cfg.target_layer_ids)
    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)]
    pool = drafter.new_pool(sum(len(s) for s in seqs))
    bases = [sum(len(s) for s in seqs[:i]) for i in range(len(seqs))]
    for seq, base in zip(seqs, bases):
        out = target.extend(target.new_state(), torch.tensor(seq))
        # context K/V depend only on each position's own features, so all positions can be
        # written up front; a block at s reads positions < s only
        positions = torch.arange(len(seq))
        drafter.append_context(pool, out.features, positions, base + positions)

    # block start of each walk: the first continuation token (emitted by prefill)
    starts = [len(p) for p in prompts]
    commit_lens: list[list[int]] = [[] for _ in seqs]
    while active := [i for i, s in enumerate(starts) if s < len(seqs[i]) - 1]:
        candidates = draft_block(
            target, drafter, ops, pool,
            last=torch.tensor([seqs[i][starts[i]] for i in active]),
            start=torch.tensor([starts[i] for i in active]),
            slot_base=torch.tensor([bases[i] for i in active]), L=L, W=W,
        )
        for row, i in enumerate(active):
            s, seq = starts[i], seqs[i]
            left = len(seq) - 1 - s  # tokens still to emit after position s
            drafts = candidates[row, 1:].tolist()
            accept = 0
            while accept < min(W - 1, left) and drafts[accept] == seq[s + 1 + accept]:
                accept += 1
            commit_len = min(accept + 1, left)
            commit_lens[i].append(commit_len)
            starts[i] = s + commit_len
    return commit_lens


def offline_acceptance(target, drafter, ops: Ops, prompts: list[list[int]], *,
                       max_new_tokens: int, block_size: int | None = None,
                       verify_width: int | None = None,
                       ignore_eos: bool = False) -> tuple[AcceptanceStats, list[RequestResult]]:
    """Teacher-forced tau over a prompt set, with the continuations it walked."""
    L = block_size or drafter.cfg.block_size
    W = verify_width or L
    params = [SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)] * len(prompts)
    greedy = generate_plain(target, prompts, params)
    lens = teacher_forced_commit_lens(target, drafter, ops, prompts, [r.tokens for r in greedy], L, W)
    return acceptance_stats([n for per in lens for n in per], W), greedy
