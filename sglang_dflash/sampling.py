"""The target distribution a sampled request draws from, as SGLang 0.5.23's sampler defines it.

Sampled DFlash is lossless only against the distribution the plain server samples from, so
the verify (``worker.steps.accept_block``) and the reference loop (``reference.loop``) both
take their probabilities from here. SGLang's ``Sampler`` (``srt/layers/sampler.py``) divides
the logits by the temperature, takes the softmax, then filters by the server's
``--sampling-backend``; each backend defines top-k, top-p and min-p its own way:

  pytorch     ``top_k_top_p_min_p_sampling_from_probs_torch``: sort the probabilities
              descending (``topk`` over the batch's largest top_k when it is known); the
              cumulative mass is taken BEFORE top-k; zero ranks >= top_k; zero tokens whose
              preceding mass (in sort order) is > top_p; with min-p, zero tokens below
              min_p x the top probability. Ties at the top-k boundary: the sort's order.
  flashinfer  without min-p, ``top_k_top_p_sampling_from_probs(..., "joint")``: a token x
  (and        stays iff fewer than top_k tokens are strictly more likely than x and their
  intel_xpu)  mass is < top_p, both on the unfiltered distribution (ties all kept). With
              min-p, three passes in sequence: ``top_k_renorm_prob`` (the top_k, ties kept,
              renormalised), ``top_p_renorm_prob`` on that (strictly-greater mass < top_p,
              renormalised), then ``min_p_sampling_from_probs`` (keep p >= min_p x max p).

The filters run only when the batch-wide flags ask for them (``need_top_k_sampling`` ...);
with none set SGLang samples the plain softmax on either backend. The result here is the
normalised fp32 distribution (what SGLang's multinomial over the filtered weights draws
from). Greedy rows (top_k 1) are the argmax and never come here.

The torch definition is tested against SGLang's own function; the flashinfer one follows
the acceptance conditions of flashinfer's CUDA kernels (``TopKTopPSamplingFromProbKernel``:
``count_gt < k && mass_gt < top_p``; ``MinPSamplingFromProbKernel``: ``p >= max * min_p``)
and is not run against them here (no GPU, no flashinfer on CPU); where a kernel breaks a
tie at the top-k boundary its own way, the two can differ on exactly tied probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# --sampling-backend values and the definition each one selects
BACKEND_DEFINITIONS = {"pytorch": "pytorch", "flashinfer": "flashinfer", "intel_xpu": "flashinfer"}
TOP_K_ALL = 1 << 30  # SGLang's top_k for "no top-k"


@dataclass(frozen=True)
class RowSampling:
    """Per-row sampling parameters as SGLang's ``SamplingBatchInfo`` holds them, with its
    batch-wide flags, which decide (as in SGLang) whether a filter runs at all."""

    temperatures: torch.Tensor  # [N] > 0 (greedy rows carry 1.0 and top_k 1)
    top_ks: torch.Tensor  # [N] >= 1; TOP_K_ALL (or any value >= V) means no top-k
    top_ps: torch.Tensor  # [N] in (0, 1]
    min_ps: torch.Tensor  # [N] in [0, 1); 0 disables min-p
    need_top_k: bool = True
    # host bound on every row's top_k (None: unknown, or some row keeps the whole vocab)
    max_top_k: int | None = None
    need_top_p: bool = True
    need_min_p: bool = True

    def repeat_rows(self, times: int) -> RowSampling:
        """Each row's parameters ``times`` times in a row: one per verify block position."""
        rep = lambda t: t.reshape(-1).repeat_interleave(times)  # noqa: E731
        return RowSampling(rep(self.temperatures), rep(self.top_ks), rep(self.top_ps), rep(self.min_ps),
                           self.need_top_k, self.max_top_k, self.need_top_p, self.need_min_p)


def definition_of(backend: str) -> str:
    """The filter definition of a ``--sampling-backend``, or a ValueError naming the choices."""
    if backend not in BACKEND_DEFINITIONS:
        raise ValueError(f"--sampling-backend {backend!r}: DFlash verifies sampled requests for "
                         f"{sorted(BACKEND_DEFINITIONS)} only")
    return BACKEND_DEFINITIONS[backend]


def target_probs(logits: torch.Tensor, sampling: RowSampling, backend: str) -> torch.Tensor:
    """probs [N, V] fp32, each row normalised: the distribution SGLang's sampler draws from
    for logits [N, V] (already penalised and masked) under ``sampling`` [N]."""
    N, V = logits.shape
    if sampling.temperatures.numel() != N:
        raise ValueError(f"logits have {N} rows but the sampling parameters {sampling.temperatures.numel()}")
    probs = torch.softmax(logits.float() / sampling.temperatures.float().view(N, 1), dim=-1)
    if not (sampling.need_top_k or sampling.need_top_p or sampling.need_min_p):
        return probs
    if definition_of(backend) == "pytorch":
        kept = _pytorch_filter(probs, sampling)
    elif sampling.need_min_p:
        kept = _flashinfer_sequential(probs, sampling)
    else:
        kept = _flashinfer_joint(probs, sampling)
    return kept / kept.sum(dim=-1, keepdim=True)


def _pytorch_filter(probs: torch.Tensor, s: RowSampling) -> torch.Tensor:
    """SGLang's torch sampler filter: unnormalised kept weights [N, V]."""
    N, V = probs.shape
    if s.max_top_k is not None and s.max_top_k < V:
        # ranks >= max_top_k are zeroed by top-k anyway, so only the head is sorted
        sorted_p, order = probs.topk(s.max_top_k, dim=-1, sorted=True)
    else:
        sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(dim=-1)  # mass through each rank, before any filter
    ranks = torch.arange(sorted_p.shape[-1], device=probs.device)[None, :]
    sorted_p = sorted_p.masked_fill(ranks >= s.top_ks.view(N, 1), 0.0)
    sorted_p = sorted_p.masked_fill(cum - sorted_p > s.top_ps.float().view(N, 1), 0.0)
    if s.need_min_p:
        sorted_p = sorted_p.masked_fill(sorted_p < sorted_p[:, :1] * s.min_ps.float().view(N, 1), 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def _strictly_greater(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count [N, V], mass [N, V]) of the tokens strictly more likely than each token.

    E.g. probs [0.4, 0.2, 0.2, 0.1, 0.1] -> count [0, 1, 1, 3, 3], mass [0, .4, .4, .8, .8].
    """
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the ranks before each rank
    ranks = torch.arange(probs.shape[-1], device=probs.device).expand_as(sorted_p)
    new_value = torch.ones_like(sorted_p, dtype=torch.bool)
    new_value[:, 1:] = sorted_p[:, 1:] != sorted_p[:, :-1]
    # every tie takes the rank (and preceding mass) of its first member
    first = torch.where(new_value, ranks, 0).cummax(dim=-1).values
    count = torch.empty_like(ranks).scatter_(-1, order, first)
    mass = torch.empty_like(probs).scatter_(-1, order, before.gather(-1, first))
    return count, mass


def _flashinfer_joint(probs: torch.Tensor, s: RowSampling) -> torch.Tensor:
    N = probs.shape[0]
    count, mass = _strictly_greater(probs)
    keep = (count < s.top_ks.view(N, 1)) & (mass < s.top_ps.float().view(N, 1))
    return probs.masked_fill(~keep, 0.0)


def _flashinfer_sequential(probs: torch.Tensor, s: RowSampling) -> torch.Tensor:
    N = probs.shape[0]
    count, _ = _strictly_greater(probs)
    probs = probs.masked_fill(count >= s.top_ks.view(N, 1), 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    _, mass = _strictly_greater(probs)
    probs = probs.masked_fill(mass >= s.top_ps.float().view(N, 1), 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    floor = probs.max(dim=-1, keepdim=True).values * s.min_ps.float().view(N, 1)
    return probs.masked_fill(probs < floor, 0.0)
