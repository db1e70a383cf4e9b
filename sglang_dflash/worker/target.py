"""The target model as the DFlash worker drives it through SGLang, and the drafter it needs.

``SGLangTarget`` is the worker's only door to the target: SGLang's ``TpModelWorker``
runs the extend (first token sampled, features captured) and the TARGET_VERIFY forward
exactly as SGLang's own DFLASH worker sets them up, and SGLang's hybrid attention
backend commits the linear-attention state. The tests stand the pure-torch reference
target behind the same members.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.configs.hybrid_arch import mambaish_config
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
from sglang.srt.speculative.dflash_info import DFlashVerifyInput

from ..backend import get_ops
from ..config import load_drafter_config
from ..drafter import load_drafter
from ..pair import check_pair
from ..target_config import target_config_from_dict
from .settings import WorkerConfig

logger = logging.getLogger("sglang_dflash")


def lm_head_shard(lm_head) -> tuple[torch.Tensor, int]:
    """(weight [V_local, H], first token id) of this rank's lm_head rows, padding dropped."""
    weight = getattr(lm_head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"DFlash drafts through the target's lm_head weight; {type(lm_head).__name__} "
                         "has no dense 2-D `weight` (quantized lm_head is not supported)")
    shard = getattr(lm_head, "shard_indices", None)
    if shard is None:
        return weight, 0
    return weight[: shard.num_org_elements], int(shard.org_vocab_start_index)


def load_drafter_for(cfg: WorkerConfig, runner, device: torch.device):
    """The drafter checked against the target SGLang loaded, on the target's device."""
    drafter_cfg = load_drafter_config(cfg.drafter_path)
    model_config = runner.model_config
    target_source = f"{model_config.model_path} (config.json)"
    target_cfg = target_config_from_dict(model_config.hf_config.to_dict(), target_source)
    check_pair(drafter_cfg, target_cfg, f"{cfg.drafter_path} (config.json)", target_source)
    # SGLang picks the captured layers itself, from the same drafter config
    captured = list(runner.spec_aux_config.dflash_target_layer_ids or [])
    if captured != list(drafter_cfg.target_layer_ids):
        raise ValueError(f"{cfg.drafter_path}: target_layer_ids {list(drafter_cfg.target_layer_ids)} "
                         f"but SGLang captures target layers {captured}")
    if cfg.verify_width > drafter_cfg.block_size:
        raise ValueError(f"--speculative-num-draft-tokens {cfg.verify_width} (the verify width) exceeds "
                         f"the drafter's block_size {drafter_cfg.block_size} ({cfg.drafter_path}); "
                         f"the target can verify at most the {drafter_cfg.block_size} positions drafted")
    drafter = load_drafter(cfg.drafter_path, target_cfg.hidden_size, dtype=runner.dtype)
    drafter = drafter.to(device)
    drafter.ops = get_ops(cfg.op_backend)
    return drafter


class SGLangTarget:
    """The target as the worker drives it: SGLang's TpModelWorker and its ModelRunner.

    The worker's only door to the target model: ``req_to_token``, ``embed_tokens``,
    ``lm_head_weight`` / ``vocab_start`` and four calls. The tests put the pure-torch
    reference target behind the same members.
    """

    def __init__(self, target_worker, verify_width: int):
        self.tp_worker = target_worker
        self.verify_width = verify_width
        model = target_worker.model_runner.model
        self.embed_tokens = model.get_input_embeddings()
        self.lm_head_weight, self.vocab_start = lm_head_shard(model.lm_head)

    @property
    def req_to_token(self) -> torch.Tensor:
        return self.tp_worker.model_runner.req_to_token_pool.req_to_token

    def has_linear_state(self) -> bool:
        """Whether verify leaves linear-attention state to commit (hybrid targets)."""
        runner = self.tp_worker.model_runner
        if mambaish_config(runner.model_config) is None:
            return False
        if not hasattr(runner.attn_backend, "update_mamba_state_after_mtp_verify"):
            raise ValueError(f"the target has linear-attention layers but its attention backend "
                             f"{type(runner.attn_backend).__name__} cannot commit their state after a "
                             "verify (no update_mamba_state_after_mtp_verify)")
        return True

    def extend(self, batch) -> GenerationBatchResult:
        """The target's extend forward, sampling the first token, features captured."""
        return self.tp_worker.forward_batch_generation(batch, capture_hidden_mode=CaptureHiddenMode.FULL)

    def verify(self, batch, candidates, positions, cache_loc) -> GenerationBatchResult:
        """The TARGET_VERIFY forward over candidates [B, W] at positions [B, W], writing the
        target KV of the verified positions to cache_loc [B, W]; logits and features of each."""
        W = self.verify_width
        verify_input = DFlashVerifyInput(
            draft_token=candidates.reshape(-1), positions=positions.reshape(-1), draft_token_num=W,
            custom_mask=None, capture_hidden_mode=CaptureHiddenMode.FULL)
        batch.out_cache_loc = cache_loc.reshape(-1)
        # the DFLASH convention the attention backends plan with: while verify is prepared,
        # host lengths count the verified positions (committed prefix + W); device seq_lens do not
        saved = batch.seq_lens_cpu, batch.seq_lens_sum
        reserved = batch.spec_info.nxt_kv_lens_cpu
        if batch.seq_lens_cpu is not None:
            batch.seq_lens_cpu = batch.seq_lens_cpu + W
            batch.seq_lens_sum = int(batch.seq_lens_cpu.sum())
        elif reserved is not None:
            batch.seq_lens_cpu, batch.seq_lens_sum = reserved, int(batch.spec_info.nxt_kv_lens_sum)
        try:
            forward_batch, _ = verify_input.prepare_for_verify(batch, self.tp_worker)
        finally:
            batch.seq_lens_cpu, batch.seq_lens_sum = saved
        # prepare_for_verify planned the attention metadata (or loaded the graph batch)
        forward_batch.mark_forward_metadata_ready()
        return self.tp_worker.forward_batch_generation(batch=None, forward_batch=forward_batch, is_verify=True)

    def commit_linear_state(self, batch, last_steps: torch.Tensor, steps_to_track: torch.Tensor | None) -> None:
        """Keep the linear-attention state after block step last_steps [B] of each request.

        SGLang's own commit (hybrid_linear_attn_backend): a scatter of the verify's
        per-step states, a ReplaySSM-KDA replay of the accepted prefix, or the KDA
        fused-accept bookkeeping, whichever the target's backend was built for.
        """
        runner = self.tp_worker.model_runner
        runner.attn_backend.update_mamba_state_after_mtp_verify(
            last_correct_step_indices=last_steps,
            mamba_track_indices=batch.mamba_track_indices,
            mamba_steps_to_track=steps_to_track,
            model=runner.model,
            req_pool_indices=batch.req_pool_indices[: last_steps.shape[0]],
        )
