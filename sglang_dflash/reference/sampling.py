"""Sampling parameters and the target distribution they define.

Drafts are always greedy; only verification and the prefill token use these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import TOP_K_ALL, RowSampling, target_probs


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    # 0 means greedy (argmax); > 0 samples from softmax(logits / temperature)
    temperature: float = 0.0
    top_p: float = 1.0
    # 0 disables top-k
    top_k: int = 0
    # 0 disables min-p; else tokens below min_p x the top probability are dropped
    min_p: float = 0.0
    # extra stop ids on top of the target's EOS ids
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def stop_ids(self, eos_token_ids: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.stop_token_ids) + (() if self.ignore_eos else tuple(eos_token_ids))


def probs_from_logits(logits: torch.Tensor, params: SamplingParams, backend: str = "pytorch") -> torch.Tensor:
    """Target distribution [..., V] fp32 of logits [..., V]: SGLang's sampler's definition of
    temperature, top-k, top-p and min-p for ``backend`` (``sglang_dflash.sampling``), for a
    request sampled on its own (the batch-wide filter flags are this request's)."""
    assert not params.greedy, "greedy requests take the argmax, not a distribution"
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)
    N = rows.shape[0]
    top_k = params.top_k if 0 < params.top_k < TOP_K_ALL else TOP_K_ALL
    sampling = RowSampling(
        temperatures=torch.full((N,), params.temperature), top_ks=torch.full((N,), top_k),
        top_ps=torch.full((N,), params.top_p), min_ps=torch.full((N,), params.min_p),
        need_top_k=top_k != TOP_K_ALL, max_top_k=top_k if top_k != TOP_K_ALL else None,
        need_top_p=params.top_p != 1.0, need_min_p=params.min_p > 0)
    return target_probs(rows, sampling, backend).view(logits.shape)
