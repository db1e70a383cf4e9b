"""The worker's configuration, read once from SGLang's resolved settings at start-up.

``read_server_settings`` is the only place the worker reads SGLang's runtime context or
the environment; ``worker_config`` turns those settings into a frozen ``WorkerConfig`` or
refuses the combination with one error that lists every reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..backend import BACKENDS
from ..draft_pool import POOL_DTYPES
from ..sampling import BACKEND_DEFINITIONS

# op backend: "triton" kernels or "torch" twins; unset = triton on CUDA, torch elsewhere
OPS_ENV = "SGLANG_DFLASH_OPS"


@dataclass(frozen=True)
class ServerSettings:
    """The SGLang settings the DFlash worker depends on, as resolved at start-up."""

    drafter_path: str | None
    # --speculative-num-draft-tokens: the positions the target verifies (the drafter's
    # block is its own config's block_size)
    verify_width: int | None
    device: str
    tp_size: int
    pp_size: int
    dp_attention: bool
    topk: int | None  # --speculative-eagle-topk
    draft_window_size: int | None
    hierarchical_cache: bool
    disaggregation_mode: str
    unified_memory: bool
    lora: bool
    adaptive: bool
    ops_env: str | None  # the value of SGLANG_DFLASH_OPS
    # batch sizes SGLang captures decode CUDA graphs for; None: decode graphs disabled
    # (--disable-cuda-graph or --cuda-graph-backend-decode disabled)
    cuda_graph_bs: tuple[int, ...] | None = None
    sampling_backend: str = "pytorch"  # --sampling-backend, as SGLang resolved it
    # what SGLang's memory planner resolves the draft K/V dtype from
    # (mem_cache/draft_kv_budget.py resolve_dflash_draft_cell_size)
    kv_cache_dtype: str = "auto"  # --kv-cache-dtype
    draft_kv_cache_dtype: str | None = None  # --speculative-draft-kv-cache-dtype
    draft_attention_backend: str | None = None  # --speculative-draft-attention-backend
    # the dtype of SGLang's draft ModelConfig (spec_aux_config.draft_model_config)
    draft_model_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class WorkerConfig:
    drafter_path: str
    verify_width: int  # W: bonus + W-1 drafts verified; 2 <= W <= the drafter's block
    op_backend: str
    tp_size: int
    # draft CUDA graph buckets (SGLang's decode batch sizes); None: the draft runs eagerly
    cuda_graph_bs: tuple[int, ...] | None = None
    # --sampling-backend: its top-k / top-p / min-p define a sampled request's distribution
    sampling_backend: str = "pytorch"
    # the draft K/V pool's dtype, as SGLang's planner priced it; None: the drafter's dtype
    draft_kv_dtype: torch.dtype | None = None


def read_server_settings(device: str, draft_model_dtype: torch.dtype | None = None) -> ServerSettings:
    """The settings of this SGLang process (scheduler side, runtime context published);
    ``draft_model_dtype``: the dtype of the draft ModelConfig SGLang's planner priced."""
    from sglang.srt.runtime_context import (
        get_disagg,
        get_exec,
        get_lora,
        get_memory,
        get_model,
        get_parallel,
        get_spec,
    )

    spec, memory, parallel = get_spec(), get_memory(), get_parallel()
    graphs = get_exec().graph.cuda_graph_config
    decode = graphs.decode if graphs is not None else None
    graph_bs = None
    if decode is not None and decode.backend != "disabled" and decode.bs:
        graph_bs = tuple(int(b) for b in decode.bs)
    return ServerSettings(
        drafter_path=spec.speculative_draft_model_path,
        verify_width=spec.speculative_num_draft_tokens,
        device=device,
        tp_size=int(parallel.tp_size),
        pp_size=int(parallel.pp_size),
        dp_attention=bool(parallel.attn_dp_enabled),
        topk=spec.speculative_eagle_topk,
        draft_window_size=spec.speculative_draft_window_size,
        hierarchical_cache=bool(memory.enable_hierarchical_cache),
        disaggregation_mode=str(get_disagg().disaggregation_mode),
        unified_memory=bool(memory.enable_unified_memory),
        lora=bool(get_lora().enable_lora),
        adaptive=bool(spec.speculative_adaptive),
        ops_env=os.environ.get(OPS_ENV),
        cuda_graph_bs=graph_bs,
        sampling_backend=str(get_exec().kernel.sampling_backend),
        kv_cache_dtype=get_model().kv_cache_dtype,
        draft_kv_cache_dtype=spec.speculative_draft_kv_cache_dtype,
        draft_attention_backend=spec.speculative_draft_attention_backend,
        draft_model_dtype=draft_model_dtype,
    )


def priced_draft_kv_dtype(s: ServerSettings) -> torch.dtype | None:
    """The draft K/V dtype SGLang's memory planner charges for: the same call with the
    same arguments as its ``resolve_dflash_draft_cell_size``, so the pool the worker
    allocates is the one priced. None: the drafter's own dtype (no planner dtype known)."""
    from sglang.srt.mem_cache.kv_cache_dtype import configure_kv_cache_dtype

    _, dtype = configure_kv_cache_dtype(
        server_args_kv_cache_dtype=s.kv_cache_dtype, speculative_draft_kv_cache_dtype=s.draft_kv_cache_dtype,
        model=None, model_dtype=s.draft_model_dtype, is_draft_worker=True, is_dflash=True,
        speculative_draft_attention_backend=s.draft_attention_backend)
    return dtype


def _draft_kv_problem(s: ServerSettings) -> str | None:
    flag = (f"--speculative-draft-kv-cache-dtype {s.draft_kv_cache_dtype}" if s.draft_kv_cache_dtype is not None
            else f"--kv-cache-dtype {s.kv_cache_dtype} (the draft K/V follows it)")
    try:
        dtype = priced_draft_kv_dtype(s)
    except ValueError as e:
        return f"{flag}: {e}"
    if dtype is not None and dtype not in POOL_DTYPES:
        return (f"{flag} gives a {dtype} draft K/V pool; the DFlash pool holds fp8_e4m3, bf16, or the "
                "model dtype ('auto'): pass --speculative-draft-kv-cache-dtype with one of them")
    return None


def _problems(s: ServerSettings) -> list[str]:
    refusals = [
        (s.drafter_path is None, "--speculative-draft-model-path is required (the DFlash drafter directory)"),
        (s.verify_width is None or s.verify_width < 2,
         f"--speculative-num-draft-tokens must be >= 2 (the verify width), got {s.verify_width}"),
        (s.pp_size != 1, f"pipeline parallelism is not supported (--pp-size {s.pp_size}); use 1"),
        (s.dp_attention, "--enable-dp-attention is not supported"),
        (s.topk not in (None, 1), f"DFlash verifies a chain: --speculative-eagle-topk must be 1, got {s.topk}"),
        (s.draft_window_size is not None,
         "--speculative-draft-window-size is not supported (the draft attends to the whole context)"),
        (s.hierarchical_cache, "--enable-hierarchical-cache is not supported (the draft context KV "
                               "is not backed up to host memory)"),
        (s.disaggregation_mode != "null",
         f"prefill/decode disaggregation is not supported (--disaggregation-mode {s.disaggregation_mode})"),
        (s.unified_memory, "--enable-unified-memory is not supported (the draft pool is indexed by "
                           "SGLang's token slot ids)"),
        (s.lora, "--enable-lora is not supported (the drafter borrows the base embed_tokens and lm_head)"),
        (s.adaptive, "--speculative-adaptive is not supported (the block size is fixed)"),
        (s.ops_env is not None and s.ops_env not in BACKENDS,
         f"{OPS_ENV}={s.ops_env!r}: expected one of {BACKENDS}"),
        (s.cuda_graph_bs is not None and not s.device.startswith("cuda"),
         f"the DFlash draft captures CUDA graphs, which need a CUDA device (device {s.device}); "
         "pass --disable-cuda-graph"),
        (s.sampling_backend not in BACKEND_DEFINITIONS,
         f"--sampling-backend {s.sampling_backend} is not supported: the sampled verify follows the "
         f"filters of {sorted(BACKEND_DEFINITIONS)}"),
    ]
    problems = [message for refused, message in refusals if refused]
    draft_kv = _draft_kv_problem(s)
    return problems + ([draft_kv] if draft_kv else [])


def worker_config(s: ServerSettings) -> WorkerConfig:
    """The worker's config, or a ValueError naming every unsupported setting."""
    problems = _problems(s)
    if problems:
        raise ValueError("DFlash worker cannot start:\n" + "\n".join(f"  - {p}" for p in problems))
    backend = s.ops_env or ("triton" if s.device.startswith("cuda") else "torch")
    return WorkerConfig(drafter_path=s.drafter_path, verify_width=int(s.verify_width),
                        op_backend=backend, tp_size=s.tp_size, cuda_graph_bs=s.cuda_graph_bs,
                        sampling_backend=s.sampling_backend, draft_kv_dtype=priced_draft_kv_dtype(s))
