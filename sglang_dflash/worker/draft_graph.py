"""The draft of a decode step with static shapes: run eagerly, or replayed from one CUDA
graph per batch bucket.

``draft_block`` is the whole draft: block embed ([bonus, MASK x L-1] through the
target's ``embed_tokens``) -> the draft layers over the whole trained block L -> the
greedy head over the full vocabulary (the tensor-parallel gather inside ``head``) at the
W - 1 positions the target verifies. Every shape in it follows from
the batch size and sizes fixed at start-up (block, hidden, the width of SGLang's
``req_to_token``, the vocabulary shard); the draft context is read straight from the
request rows of ``req_to_token``, cut to each request's length on the device; and
nothing reads device data back to the host. So a graph captured for a batch of ``Bp``
rows replays correctly for every batch of up to ``Bp`` requests at any context lengths:
``DraftRunner.draft`` copies the batch into the bucket's input buffer (padding rows: token
0 at positions 0.., no context, table row 0; their drafts are dropped) and replays.

Eager drafting (``--disable-cuda-graph``) is a start-up choice the worker logs, and a
batch above the largest bucket drafts eagerly as SGLang's own graph runners do, logged
when the graphs are captured; no error ever switches one mode for the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..drafter import DFlashDrafter, DraftKVPool


@dataclass(frozen=True)
class DraftParts:
    """What a draft step reads; every tensor is allocated once, at start-up."""

    drafter: DFlashDrafter
    pool: DraftKVPool
    embed: Callable[[torch.Tensor], torch.Tensor]  # [T] token ids -> [T, H] target embeddings
    head: Callable[[torch.Tensor], torch.Tensor]   # [T, H] -> [T] int64 greedy tokens, full vocab
    req_to_token: torch.Tensor                     # [R, C] KV slot of (request row, position)
    mask_token_id: int
    block_size: int    # L, the drafter's trained block: every position is drafted
    verify_width: int  # W <= L: the positions the target verifies get a token


def draft_block(
    parts: DraftParts,
    bonus: torch.Tensor,     # [B] int64 last committed token of each request
    seq_lens: torch.Tensor,  # [B] int64 committed lengths = position of the bonus token
    rows: torch.Tensor,      # [B] int64 request rows of req_to_token
) -> torch.Tensor:           # [B, W] int64 candidates: the bonus, then W-1 greedy drafts
    """One draft, shapes from B alone; the block and its positions are those of
    ``steps.block_inputs``."""
    B, L, W = bonus.shape[0], parts.block_size, parts.verify_width
    offsets = torch.arange(L, device=bonus.device)
    block_ids = torch.where(offsets[None, :] == 0, bonus[:, None].to(torch.int64), parts.mask_token_id)
    positions = seq_lens[:, None].to(torch.int64) + offsets[None, :]  # [B, L]
    embeds = parts.embed(block_ids.reshape(-1)).view(B, L, -1)
    cos, sin = parts.drafter.rope(positions)
    hidden = parts.drafter.forward_layers(parts.pool, embeds, cos, sin, parts.req_to_token, rows, seq_lens)
    # the whole block shapes every position (bidirectional); only the verified need a token
    drafts = parts.head(hidden[:, 1:W].reshape(B * (W - 1), -1))
    return torch.cat([block_ids[:, :1], drafts.to(torch.int64).view(B, W - 1)], dim=1)


Capture = Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]


def direct_call(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A 'capture' whose replay calls the function again: graph mode's code path without a
    GPU (tests), every replay reading the bucket's input buffer."""
    return fn


class CudaGraphCapture:
    """Captures draft functions into CUDA graphs on ``stream``, all in one memory pool
    (capture the largest bucket first; smaller graphs then reuse its memory)."""

    def __init__(self, stream: torch.cuda.Stream | None = None):
        self.stream = stream
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        # one eager run first: Triton loads its binaries and cuBLAS picks its kernels
        # outside the graph, where nothing of that may be recorded
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


class DraftRunner:
    """Drafts decode steps: eagerly until ``capture`` ran, then by replaying the graph of
    the smallest batch bucket that holds the batch."""

    def __init__(self, parts: DraftParts):
        self.parts = parts
        # bucket size -> (inputs [3, Bp] int64: bonus, seq_lens, rows; replay -> [Bp, W])
        self.buckets: dict[int, tuple[torch.Tensor, Callable[[], torch.Tensor]]] = {}

    @property
    def largest_bucket(self) -> int:
        return max(self.buckets, default=0)

    def capture(self, sizes, capture: Capture) -> None:
        device = self.parts.req_to_token.device
        for size in sorted(set(int(s) for s in sizes), reverse=True):
            if size < 1:
                raise ValueError(f"DFlash draft graphs: batch bucket sizes must be >= 1, got {sorted(sizes)}")
            inputs = torch.zeros(3, size, dtype=torch.int64, device=device)
            replay = capture(lambda inputs=inputs: draft_block(self.parts, inputs[0], inputs[1], inputs[2]))
            self.buckets[size] = (inputs, replay)

    def bucket_for(self, batch_size: int) -> int | None:
        """The smallest bucket holding the batch; None: eager (no graphs, or a larger batch)."""
        return min((s for s in self.buckets if s >= batch_size), default=None)

    def draft(self, bonus: torch.Tensor, seq_lens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """candidates [B, W] int64 for bonus / seq_lens / rows [B]."""
        B = bonus.shape[0]
        size = self.bucket_for(B)
        if size is None:
            return draft_block(self.parts, bonus, seq_lens, rows)
        inputs, replay = self.buckets[size]
        if B < size:
            inputs[:, B:].zero_()
        inputs[0, :B].copy_(bonus)
        inputs[1, :B].copy_(seq_lens)
        inputs[2, :B].copy_(rows)
        # a copy: the next replay rewrites the graph's output while these are verified
        return replay()[:B].clone()
