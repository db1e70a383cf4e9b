"""Start-up warm-up: compile every Triton binary a serving run can launch, before serving.

Triton compiles a kernel the first time it meets a new specialisation (dtypes, integer
arguments equal to 1 or divisible by 16, pointer alignment, constexprs), which takes
seconds; in the middle of serving that is a stall of every running request.
``serving_launches`` runs the serving path's own code (``draft_block`` at each batch
size, acceptance of the verify, greedy and sampled, and the context append) on ``meta``
tensors of the serving shapes with every launch recorded, not run; ``warm_up`` compiles
each distinct binary into Triton's cache for this process's GPU, so the first real
launches find them. The draft's binaries depend on the batch only through ``M = B (W-1)``
(``M % 16``, ``M == 1``, the greedy head's tile class) and the number of attention splits,
so batch sizes 1..64 cover every batch, even above 64.

The greedy head's tensor-parallel combine is recorded here as the worker's
``_greedy_tokens`` makes it; a binary missed here is compiled on first use, as before.
"""

from __future__ import annotations

import time

import torch

from ..drafter import DFlashDrafter
from ..kernels.jit_launches import Launch, distinct, jit_of, record_launches
from .draft_graph import DraftParts, draft_block
from .steps import RowSampling, accept_block

# eager drafting meets any batch size; these cover every specialisation (see above)
EAGER_BATCH_SIZES = tuple(range(1, 65))


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _meta_sampling(B: int) -> RowSampling:
    def floats():
        return _meta(B, dtype=torch.float32)

    return RowSampling(temperatures=floats(), top_ks=_meta(B, dtype=torch.int64), top_ps=floats(),
                       min_ps=floats(), need_top_k=True, max_top_k=None, need_top_p=True, need_min_p=True)


def serving_launches(
    drafter: DFlashDrafter,    # the serving drafter (its config, dtype and ops are used)
    req_to_token: torch.Tensor,  # the real [R, C] table (only its shape and dtype are used)
    lm_head_rows: int,         # vocabulary rows of this rank's lm_head shard
    vocab_size: int,           # full vocabulary of the verify logits
    tp_size: int,
    block_size: int,           # L, the drafter's block
    verify_width: int,         # W, the positions the target verifies
    batch_sizes,
    sm_count: int | None,
) -> list[Launch]:
    """Every Triton launch of the serving path at ``batch_sizes``, recorded on meta tensors."""
    cfg, dtype, L, W = drafter.cfg, drafter.fc.weight.dtype, block_size, verify_width
    with torch.device("meta"):
        meta = DFlashDrafter(cfg).to(dtype)
    meta.ops, meta.kv_dtype = drafter.ops, drafter.kv_dtype
    pool = meta.new_pool(8)
    lm_head = _meta(lm_head_rows, cfg.hidden_size, dtype=dtype)

    def head(hidden):
        maxes, tokens = drafter.ops.greedy_head(hidden, lm_head, 0)
        if tp_size == 1:
            return tokens
        T = hidden.shape[0]
        return drafter.ops.combine_shards(_meta(tp_size, T, dtype=maxes.dtype), _meta(tp_size, T, dtype=tokens.dtype))

    parts = DraftParts(meta, pool, lambda ids: _meta(ids.shape[0], cfg.hidden_size, dtype=dtype), head,
                       _meta(*req_to_token.shape, dtype=req_to_token.dtype), cfg.mask_token_id, L, W)
    width = cfg.num_target_layers * cfg.hidden_size
    with torch.no_grad(), record_launches(sm_count) as launches:
        for B in sorted(set(batch_sizes)):
            ints = _meta(B, dtype=torch.int64)
            candidates = draft_block(parts, ints, ints, ints)
            logits = _meta(B, W, vocab_size, dtype=torch.float32)
            accept_block(drafter.ops, candidates, logits, None, None)
            accept_block(drafter.ops, candidates, logits, _meta_sampling(B), _meta(B, dtype=torch.bool))
            positions = _meta(B * W, dtype=torch.int64)
            meta.append_context(pool, _meta(B * W, width, dtype=dtype), positions, positions)
    return launches


def warm_up(launches: list[Launch]) -> tuple[int, float]:
    """Compile the distinct binaries of ``launches`` for the current GPU into Triton's
    cache; returns (binaries, seconds)."""
    from triton.runtime import driver

    start = time.perf_counter()
    unique = distinct(launches, driver.active.get_current_target())
    for launch, _ in unique.values():
        jit_of(launch.kernel).warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    return len(unique), time.perf_counter() - start
