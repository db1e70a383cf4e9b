"""Sampling parameters and the target distribution they define.

Drafts are always greedy; only verification and the prefill token use these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    # 0 means greedy (argmax); > 0 samples from softmax(logits / temperature)
    temperature: float = 0.0
    top_p: float = 1.0
    # 0 disables top-k
    top_k: int = 0
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def stop_ids(self, eos_token_ids: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.stop_token_ids) + (() if self.ignore_eos else tuple(eos_token_ids))


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Target distribution after temperature, top-k and top-p, normalised, fp32.

    logits: [..., V]. Ties at the top-k / top-p boundary keep every tied token, so the
    result does not depend on sort stability.
    """
    assert not params.greedy, "greedy requests take the argmax, not a distribution"
    scaled = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth = scaled.topk(params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, _ = probs.sort(dim=-1, descending=True)
        # mass strictly before each sorted token; keep tokens whose preceding mass < top_p
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep_sorted = before < params.top_p
        # the smallest kept probability is the threshold, applied by value (tie-safe)
        threshold = sorted_probs.masked_fill(~keep_sorted, float("inf")).min(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
