"""DFlashWorker: the DFlash step (reference/loop.py) as an SGLang 0.5.23 spec-v2 worker.

The scheduler contract it implements is the package docstring (``sglang_dflash.worker``).
"""

from __future__ import annotations

import logging
import time

import torch
from sglang.srt.configs.draft_parallel import DraftParallelLayout
from sglang.srt.layers.logprob_processor import compute_spec_logprobs
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.runtime_context import get_parallel, mamba_track_grid
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.dflash_info_v2 import DFlashDraftInputV2
from sglang.srt.speculative.draft_worker_common import make_draft_input_v2
from sglang.srt.speculative.spec_sampling_mask import SpeculativeSamplingMaskCapture
from sglang.srt.speculative.spec_utils import GrammarTree, build_grammar_vocab_mask

from ..kernels.draft_attention import sm_count
from .draft_graph import CudaGraphCapture, DraftParts, DraftRunner
from .history import OutputHistory
from .logits import (apply_custom_processors, block_penalties, history_frequency, penalise_block,
                     reads_output_history)
from .settings import WorkerConfig, read_server_settings, worker_config
from .stats import AcceptanceCounter
from .steps import (
    RowSampling,
    SpecOutputs,
    accept_block,
    block_inputs,
    extend_positions,
    mamba_steps_to_track,
    spec_outputs,
)
from .target import SGLangTarget, load_drafter_for
from .warmup import EAGER_BATCH_SIZES, serving_launches, warm_up

logger = logging.getLogger("sglang_dflash")


def row_sampling(sampling_info) -> tuple[RowSampling | None, torch.Tensor | None]:
    """The sampled rows' parameters (None: all greedy) and the greedy-row mask (None: none).

    SGLang stores temperature 0 as top_k 1 (and temperature 1), so a row is greedy
    exactly when its top_k is 1.
    """
    if sampling_info is None or sampling_info.is_all_greedy:
        return None, None
    sampling = RowSampling(
        temperatures=sampling_info.temperatures.reshape(-1),
        top_ks=sampling_info.top_ks.reshape(-1),
        top_ps=sampling_info.top_ps.reshape(-1),
        min_ps=sampling_info.min_ps.reshape(-1),
        need_top_k=bool(sampling_info.need_top_k_sampling),
        max_top_k=sampling_info.max_top_k,
        need_top_p=bool(sampling_info.need_top_p_sampling),
        need_min_p=bool(sampling_info.need_min_p_sampling),
    )
    greedy_rows = sampling_info.top_ks.reshape(-1) <= 1 if sampling_info.is_any_greedy else None
    return sampling, greedy_rows


class DFlashWorker(BaseSpecWorker):
    """Prefill with feature capture, then per decode step: draft -> verify -> accept -> commit."""

    # The scheduler hands this layout to the target's memory planner, which charges the
    # draft K/V at its attention TP width (kv_cache_configurator.draft_attn_tp_size). The
    # drafter runs whole on every rank, all KV heads in every rank's pool: width 1.
    draft_parallel_layout = DraftParallelLayout(tp_group=None, attn_tp_size=1)

    def __init__(self, server_args, gpu_id: int, nccl_port: int, target_worker):
        device = target_worker.model_runner.model.lm_head.weight.device
        draft_model = target_worker.model_runner.spec_aux_config.draft_model_config
        cfg = worker_config(read_server_settings(str(device), draft_model.dtype))
        drafter = load_drafter_for(cfg, target_worker.model_runner, device)
        tp_group = get_parallel().tp_group if cfg.tp_size > 1 else None
        self._setup(target_worker, cfg, drafter, SGLangTarget(target_worker, cfg.verify_width), tp_group)

    @classmethod
    def from_parts(cls, target_worker, cfg: WorkerConfig, drafter, target, tp_group=None) -> DFlashWorker:
        """A worker over given parts, without reading SGLang's runtime context (tests)."""
        worker = cls.__new__(cls)
        worker._setup(target_worker, cfg, drafter, target, tp_group)
        return worker

    def _setup(self, target_worker, cfg: WorkerConfig, drafter, target, tp_group) -> None:
        super().__init__()
        self._target_worker = target_worker
        # no SGLang draft worker: every draft-runner hook of BaseSpecWorker sees None
        self._draft_worker = None
        self.cfg, self.drafter, self.target, self.tp_group = cfg, drafter, target, tp_group
        # the drafter always drafts its trained block L; the target verifies W <= L of it
        self.block_size = drafter.cfg.block_size
        self.verify_width = cfg.verify_width
        self.acceptance = AcceptanceCounter(self.verify_width)
        self.mask_token_id = drafter.cfg.mask_token_id
        self.device = target.lm_head_weight.device
        self.pool = None
        self.pool_slots = 0
        self.draft_runner = None
        self.history: OutputHistory | None = None
        self.commit_linear_state = False
        logger.info("DFlash worker: drafter %s, block %d, verify width %d, ops %s, tp %d", cfg.drafter_path,
                    self.block_size, self.verify_width, cfg.op_backend, cfg.tp_size)

    # ---- start-up hooks ----

    def alloc_memory_pool(self, memory_pool_config=None, req_to_token_pool=None,
                          token_to_kv_pool_allocator=None):
        super().alloc_memory_pool(memory_pool_config, req_to_token_pool, token_to_kv_pool_allocator)
        # one draft-context row per slot id the target's allocator can hand out (slot 0 is
        # SGLang's padding slot); SGLang's KV budget already set aside room for it
        self.pool_slots = token_to_kv_pool_allocator.size + token_to_kv_pool_allocator.page_size
        self.pool = self.drafter.new_pool(self.pool_slots, dtype=self.cfg.draft_kv_dtype)
        # the Triton binaries the warm-up compiles read and write a pool of this dtype
        self.drafter.kv_dtype = self.pool.k.dtype
        if self._target_worker is not None:  # None: a worker built from parts (tests)
            self._check_planned_bytes(self._target_worker.model_runner.kv_cache_configurator)
        # RoPE frequencies and stacked context weights now, never inside a graph capture
        self.drafter.prepare(self.device)
        self.draft_runner = DraftRunner(DraftParts(
            drafter=self.drafter, pool=self.pool, embed=self.target.embed_tokens, head=self._greedy_tokens,
            req_to_token=req_to_token_pool.req_to_token, mask_token_id=self.mask_token_id,
            block_size=self.block_size, verify_width=self.verify_width))
        self.history = OutputHistory(req_to_token_pool.req_to_token.shape[0], self.verify_width, self.device)

    def _check_planned_bytes(self, planner) -> None:
        """The draft pool costs per token what SGLang's memory planner set aside for it."""
        planned = planner.dflash_draft_cell_size_per_token
        held = self.pool.bytes_per_token
        logger.info("DFlash draft K/V: %s, %d B/token x %d slots = %.1f MiB; SGLang's planner charged %s B/token",
                    self.pool.k.dtype, held, self.pool_slots, held * self.pool_slots / 2**20, planned)
        if planned is None:
            logger.warning("DFlash draft K/V: SGLang's planner could not price the draft pool and scaled "
                           "the target's per-token bytes instead; the token budget may not fit it")
        elif planned != held:
            raise RuntimeError(f"DFlash draft K/V holds {held} B per token ({self.pool.k.dtype}) but SGLang's "
                               f"memory planner charged {planned} B per token for it")

    def init_attention_backends(self):
        self.commit_linear_state = self.target.has_linear_state()

    def init_cuda_graphs(self):
        """Compile every Triton binary serving can launch, then capture one draft graph per
        batch bucket, or log that the draft runs eagerly."""
        self._warm_up()
        sizes = self.cfg.cuda_graph_bs
        if sizes is None:
            logger.info("DFlash draft: eager, no CUDA graphs (decode CUDA graphs are disabled, "
                        "e.g. --disable-cuda-graph)")
            return
        from sglang.srt.distributed.parallel_state import graph_capture

        start = time.perf_counter()
        # SGLang's capture context: the tensor-parallel gather of the greedy head is recorded too
        with graph_capture() as context:
            self.draft_runner.capture(sizes, CudaGraphCapture(context.stream))
        logger.info("DFlash draft: captured %d CUDA graphs (batch buckets %s) in %.1f s; batches above %d "
                    "draft eagerly", len(sizes), sorted(sizes), time.perf_counter() - start,
                    self.draft_runner.largest_bucket)

    def _warm_up(self) -> None:
        ops = self.drafter.ops
        if ops.backend != "triton" or self.device.type != "cuda":
            logger.info("DFlash warm-up: nothing to compile (%s ops on %s)", ops.backend, self.device.type)
            return
        start = time.perf_counter()
        # verify logits span the whole vocabulary: the shards of every rank (even splits)
        vocab = self.target.lm_head_weight.shape[0] * self.cfg.tp_size
        launches = serving_launches(
            self.drafter, self.req_to_token_pool.req_to_token, self.target.lm_head_weight.shape[0], vocab,
            self.cfg.tp_size, self.block_size, self.verify_width, self.cfg.cuda_graph_bs or EAGER_BATCH_SIZES,
            sm_count(self.device))
        binaries, _ = warm_up(launches)
        logger.info("DFlash warm-up: compiled %d Triton binaries (%d launches recorded) in %.1f s",
                    binaries, len(launches), time.perf_counter() - start)

    # ---- acceptance counts (/server_info) ----

    def on_verify_complete_cpu(self, num_correct_drafts_per_req: list[int], batch_size: int = 0) -> None:
        # SGLang's accepted-draft count of every row of the verify it just settled, on the host
        self.acceptance.add(num_correct_drafts_per_req)

    def acceptance_report(self) -> dict:
        """Server-wide acceptance at this worker's verify width (see ``stats``)."""
        return self.acceptance.report(self.block_size)

    # ---- the step ----

    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None,
                                 pp_proxy_tensors=None) -> GenerationBatchResult:
        if pp_proxy_tensors is not None:
            raise ValueError("DFlash worker: pipeline parallelism is not supported")
        if batch.forward_mode.is_extend() or batch.is_extend_in_batch:
            return self._extend(batch, on_publish)
        if batch.forward_mode.is_idle():
            return self._idle(on_publish)
        return self._decode(batch, on_publish, grammar_barrier)

    def _extend(self, batch, on_publish) -> GenerationBatchResult:
        self._check_pool()
        out = self.target.extend(batch)
        out.new_seq_lens = batch.seq_lens
        if on_publish is not None:
            on_publish(batch.seq_lens)
        features = self._features(out.logits_output, batch.out_cache_loc.shape[0])
        positions = extend_positions(batch.prefix_lens, batch.extend_lens, features.device)
        self.drafter.append_context(self.pool, features, positions, batch.out_cache_loc)
        # the overlap scheduler would copy it to the host otherwise
        out.logits_output.hidden_states = None
        self._start_history(batch, out)
        out.next_draft_input = make_draft_input_v2(bonus_tokens=out.next_token_ids, new_seq_lens=batch.seq_lens)
        return out

    def _idle(self, on_publish) -> GenerationBatchResult:
        empty = DFlashDraftInputV2.create_idle_input(device=self.device)
        if on_publish is not None:
            on_publish(empty.new_seq_lens)
        return GenerationBatchResult(
            logits_output=None,
            next_token_ids=torch.empty((0,), dtype=torch.int64, device=self.device),
            accept_lens=torch.empty((0,), dtype=torch.int32, device=self.device),
            next_draft_input=empty,
            can_run_cuda_graph=False,
            speculative_num_draft_tokens=self.verify_width,
            new_seq_lens=empty.new_seq_lens,
        )

    def _decode(self, batch, on_publish, grammar_barrier) -> GenerationBatchResult:
        draft_input = batch.spec_info
        if not isinstance(draft_input, DFlashDraftInputV2):
            raise RuntimeError(f"DFlash decode expected batch.spec_info to be a DFlashDraftInputV2, "
                               f"got {type(draft_input).__name__}")
        seq_lens = batch.seq_lens  # [B] committed lengths
        if seq_lens.is_cuda:
            # under overlap, seq_lens may come from the previous iteration's stream
            seq_lens.record_stream(torch.cuda.current_stream(seq_lens.device))
        B, L, W = seq_lens.shape[0], self.block_size, self.verify_width
        block_ids, positions, cache_loc = block_inputs(
            draft_input.bonus_tokens, seq_lens, batch.req_pool_indices, self.target.req_to_token,
            self.mask_token_id, L, W)
        candidates = self._draft(batch, block_ids, positions)  # [B, W]
        positions = positions[:, :W]  # from here on: the verified positions
        grammar_tree = GrammarTree.from_linear_chain(candidates) if batch.has_grammar else None

        target_out = self.target.verify(batch, candidates, positions, cache_loc)
        logits_output = target_out.logits_output
        logits, penalties = self._verify_logits(batch, logits_output, candidates, grammar_tree, grammar_barrier)
        sampling, greedy_rows = row_sampling(batch.sampling_info)
        accept_len, emitted = accept_block(self.drafter.ops, candidates, logits.reshape(B, W, -1),
                                           sampling, greedy_rows, self.cfg.sampling_backend)
        out = spec_outputs(accept_len, emitted, seq_lens)
        self.history.commit(batch.req_pool_indices, emitted, out.commit_lens, history_frequency(penalties))
        # requests asking for the support of their sampling distribution (return_sampling_mask)
        capture = SpeculativeSamplingMaskCapture.from_logits(
            batch.sampling_info, next_token_logits=logits, draft_input=draft_input, draft_token_num=W, bs=B)
        if capture is not None:
            logits_output.sampling_mask_output = capture.build_output(
                out_tokens=out.next_token_ids.view(B, W), commit_lens=out.commit_lens)
        if batch.return_logprob:
            compute_spec_logprobs(batch, logits_output, out.next_token_ids, chain_stride=W)
        if self.commit_linear_state:
            self._commit_linear_state(batch, seq_lens, out)
        if on_publish is not None:
            on_publish(out.new_seq_lens)

        # the draft context of every verified position, at the slots the verify wrote
        features = self._features(logits_output, B * W)
        self.drafter.append_context(self.pool, features, positions.reshape(-1), cache_loc.reshape(-1))
        logits_output.hidden_states = None
        return GenerationBatchResult(
            logits_output=logits_output,
            next_token_ids=out.next_token_ids,
            accept_lens=out.commit_lens,
            can_run_cuda_graph=target_out.can_run_cuda_graph,
            next_draft_input=make_draft_input_v2(bonus_tokens=out.bonus, new_seq_lens=out.new_seq_lens),
            speculative_num_draft_tokens=W,
            new_seq_lens=out.new_seq_lens,
            routed_experts_output=target_out.routed_experts_output,
            indexer_topk_output=target_out.indexer_topk_output,
        )

    # ---- pieces of the step ----

    def _draft(self, batch, block_ids, positions) -> torch.Tensor:
        """candidates [B, W]: the bonus token followed by the first W-1 greedy drafts of the
        whole drafted block, from the batch bucket's CUDA graph or eagerly (``draft_graph``);
        the block and its ``positions`` are rebuilt there from the bonus and ``seq_lens``,
        with static shapes."""
        return self.draft_runner.draft(block_ids[:, 0], batch.seq_lens, batch.req_pool_indices)

    def _greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T] argmax of hidden [T, H] through the target's lm_head (all vocab shards)."""
        local_max, local_ids = self.drafter.ops.greedy_head(
            hidden, self.target.lm_head_weight, self.target.vocab_start)
        if self.tp_group is None:
            return local_ids
        P, T = self.cfg.tp_size, hidden.shape[0]
        # GroupCoordinator.all_gather picks the collective by the tensor's device (its
        # registered op on CUDA; sgl_kernel's shared-memory gather or gloo on CPU), whereas
        # all_gather_into_tensor has no CPU implementation in SGLang 0.5.23 without sgl_kernel.
        # Shards come back in rank order: [P*T] = rank 0's T rows, then rank 1's ...
        gathered_max = self.tp_group.all_gather(local_max.contiguous(), dim=0)
        gathered_ids = self.tp_group.all_gather(local_ids.contiguous(), dim=0)
        # highest logit over the shards, ties to the lowest token id (one full-vocab argmax)
        return self.drafter.ops.combine_shards(gathered_max.view(P, T), gathered_ids.view(P, T))

    def _verify_logits(self, batch, logits_output, candidates, grammar_tree, grammar_barrier):
        """([B*W, V] verify logits adjusted as plain decoding adjusts each position's
        (worker/logits.py), the batch's penalties or None)."""
        logits = logits_output.next_token_logits
        B, W = candidates.shape
        block = logits.view(B, W, -1)
        info = batch.sampling_info
        penalties = None if info is None else block_penalties(batch.reqs, block.shape[-1], self.device)
        if penalties is not None:
            penalise_block(block, candidates, batch.seq_lens, penalties, self.history, batch.req_pool_indices)
        if grammar_tree is not None:
            mask = build_grammar_vocab_mask(reqs=batch.reqs, tree=grammar_tree, sampling_info=info,
                                            device=logits.device, barrier=grammar_barrier)
            if mask is not None:
                mask.apply(logits)
        if info is not None and info.logit_bias is not None:
            # fp32 bias onto the logits in their dtype, as the plain sampler adds it
            block.add_(info.logit_bias[:, None, :])
        if info is not None and info.has_custom_logit_processor:
            outputs = self.history.outputs_so_far(batch.reqs, batch.req_pool_indices, batch.seq_lens)
            apply_custom_processors(block, info, batch.reqs, outputs, candidates.tolist())
        return logits, penalties

    def _start_history(self, batch, out) -> None:
        """A new output history for each request of an extend batch (worker/history.py)."""
        reqs = batch.reqs
        penalised = any(reads_output_history(r.sampling_params) for r in reqs)
        frequency = torch.tensor([r.sampling_params.frequency_penalty for r in reqs], dtype=torch.float32)
        # a penalised request comes with SGLang's sampling info, which knows the vocabulary
        vocab = batch.sampling_info.vocab_size if penalised else 0
        self.history.start(batch.req_pool_indices, out.next_token_ids, [list(r.output_ids) for r in reqs],
                           frequency.to(self.device), penalised, vocab)

    def _commit_linear_state(self, batch, seq_lens_pre: torch.Tensor, out: SpecOutputs) -> None:
        steps_to_track = None
        if batch.mamba_track_indices is not None:
            # radix caching of linear-attention states: also keep the state at the block
            # step where the request crossed a checkpoint boundary
            interval = mamba_track_grid(batch.tree_cache.page_size)
            steps_to_track = mamba_steps_to_track(seq_lens_pre, out.new_seq_lens, out.commit_lens, interval)
        self.target.commit_linear_state(batch, out.commit_lens.to(torch.int64) - 1, steps_to_track)

    def _features(self, logits_output, num_tokens: int) -> torch.Tensor:
        """[T, K*H] target features of the forward, checked against the drafter's fc input."""
        features = logits_output.hidden_states
        width = self.drafter.cfg.num_target_layers * self.drafter.cfg.hidden_size
        if features is None:
            raise RuntimeError("DFlash: the target returned no captured hidden states; the target "
                               "model needs set_dflash_layers_to_capture (see plugin.py)")
        if tuple(features.shape) != (num_tokens, width):
            raise RuntimeError(f"DFlash: captured target features {tuple(features.shape)}, expected "
                               f"({num_tokens}, {width}) = (tokens, target layers x hidden)")
        return features

    def _check_pool(self) -> None:
        allocator = self.token_to_kv_pool_allocator
        if allocator.size + allocator.page_size > self.pool_slots:
            raise RuntimeError(f"DFlash draft pool holds {self.pool_slots} slots but the target's KV "
                               f"allocator now hands out {allocator.size + allocator.page_size} "
                               "(resized after start-up?)")
