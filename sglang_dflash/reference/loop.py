"""The DFlash speculative loop in plain torch: the specification every fast path must match.

One step for a batch of requests whose last committed token sits at position ``s``:

  draft   block = [last token, MASK x (L-1)] at positions s..s+L-1, L the drafter's
          trained block; one drafter forward whose keys/values are the context K/V of
          positions < s plus the block's own; drafts = greedy argmax through the target's
          lm_head, for the first W-1 mask positions only.
  verify  the target runs the W candidates [last token, draft 1 .. draft W-1] from its
          committed state, keeping nothing. W (the verify width, 2..L) is what the target
          pays for; the draft block stays L, the context the drafter was trained with.
  accept  greedy: longest prefix with draft[j+1] == argmax_target[j], then the bonus;
          sampled: accept a draft with probability p(draft), else resample from p
          without it (lossless for a point-mass proposal). Stops cut the step short.
  commit  the target keeps commit_len positions (KDA state by replaying the accepted
          prefix, MLA K/V by appending); their features enter the draft context K/V.

Requests of different lengths share each draft forward and each accept call; the
target runs request by request, since the reference target keeps one state per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backend import Ops
from ..kernels.naive.accept import inverse_cdf_fixed_point
from .sampling import SamplingParams, probs_from_logits


@dataclass
class RequestResult:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    # tokens emitted by each verify step (commit_len); empty for plain decoding
    commit_lens: list[int] = field(default_factory=list)
    finish_reason: str = ""

    @property
    def acceptance_length(self) -> float:
        """Mean tokens per verify step (tau), the bonus token included."""
        return sum(self.commit_lens) / len(self.commit_lens) if self.commit_lens else 0.0


@dataclass
class _Request:
    result: RequestResult
    params: SamplingParams
    stop_ids: tuple[int, ...]
    state: object
    slot_base: int

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.result.tokens)

    @property
    def last_position(self) -> int:
        return len(self.result.prompt) + len(self.result.tokens) - 1


def acceptance_length(results: list[RequestResult]) -> float:
    """tau over a set of requests: all emitted tokens / all verify steps."""
    steps = sum(len(r.commit_lens) for r in results)
    return sum(sum(r.commit_lens) for r in results) / steps if steps else 0.0


def _pick(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    if params.greedy:
        return int(logits.argmax())
    u = torch.rand((1,), generator=gen)
    # the inverse CDF the sampled verify uses, with no token removed
    probs = probs_from_logits(logits.cpu(), params)[None]
    return int(inverse_cdf_fixed_point(probs, torch.tensor([-1]), u)[0])


def _append_token(req: _Request, token: int) -> None:
    req.result.tokens.append(token)
    if token in req.stop_ids:
        req.result.finish_reason = "stop"
    elif req.remaining == 0:
        req.result.finish_reason = "length"


def _prefill(target, req: _Request, gen: torch.Generator):
    prompt = torch.tensor(req.result.prompt, dtype=torch.long)
    out = target.extend(req.state, prompt)
    target.commit(req.state, out.record, len(prompt))
    _append_token(req, _pick(out.logits[-1], req.params, gen))
    return out.features


def generate_plain(target, prompts: list[list[int]], params: list[SamplingParams],
                   *, seed: int = 0) -> list[RequestResult]:
    """Autoregressive decoding with the target alone: the ground truth for DFlash."""
    gen = torch.Generator().manual_seed(seed)
    eos = tuple(target.config.eos_token_ids)
    results = []
    for prompt, p in zip(prompts, params, strict=True):
        req = _Request(RequestResult(list(prompt)), p, p.stop_ids(eos), target.new_state(), 0)
        _prefill(target, req, gen)
        while not req.result.finish_reason:
            out = target.extend(req.state, torch.tensor(req.result.tokens[-1:]))
            target.commit(req.state, out.record, 1)
            _append_token(req, _pick(out.logits[-1], req.params, gen))
        results.append(req.result)
    return results


def _stop_table(reqs: list[_Request]) -> torch.Tensor:
    """[B, E] stop ids per request, -1 padded."""
    width = max((len(r.stop_ids) for r in reqs), default=0)
    table = torch.full((len(reqs), width), -1, dtype=torch.long)
    for b, r in enumerate(reqs):
        table[b, : len(r.stop_ids)] = torch.tensor(r.stop_ids, dtype=torch.long)
    return table


def draft_block(target, drafter, ops: Ops, pool, last: torch.Tensor, start: torch.Tensor,
                slot_base: torch.Tensor, L: int, W: int | None = None) -> torch.Tensor:
    """candidates [B, W]: the last committed token followed by W-1 greedy drafts of a
    block of L (W defaults to L).

    last [B] last committed tokens, start [B] their positions (= context lengths),
    slot_base [B] where each request's position 0 lives in the draft pool.
    """
    B, device, W = last.shape[0], last.device, W or L
    check_verify_width(W, L)
    block = torch.full((B, L), drafter.cfg.mask_token_id, dtype=torch.long, device=device)
    block[:, 0] = last
    positions = start[:, None] + torch.arange(L, device=device)[None, :]  # [B, L]
    # context = positions 0..s-1; request b's position t lives in slot slot_base[b] + t
    cols = torch.arange(max(int(start.max()), 1), device=device)[None, :]
    slot_table = torch.where(cols < start[:, None], slot_base[:, None] + cols, 0)  # [B, S]
    embeds = target.model.embed_tokens(block)  # [B, L, H]
    hidden = drafter.forward_block(pool, embeds, positions, slot_table, start)  # [B, L, H]
    # every mask position shapes the others (attention is bidirectional in the block), but
    # only the W-1 the target verifies need a token
    _, drafts = ops.greedy_head(hidden[:, 1:W].reshape(B * (W - 1), -1), target.lm_head.weight, 0)
    return torch.cat([last[:, None], drafts.view(B, W - 1)], dim=1)


def check_verify_width(W: int, L: int) -> None:
    if not 2 <= W <= L:
        raise ValueError(f"verify width must lie in 2..{L} (the drafter's block), got {W}")


def _accept(ops: Ops, reqs, candidates, logits, gen):
    """accept_len [B], emitted [B, L]; greedy and sampled rows go to their own kernels."""
    (B, L), device = candidates.shape, candidates.device
    accept_len = torch.empty(B, dtype=torch.long, device=device)
    emitted = torch.empty(B, L, dtype=torch.long, device=device)
    remaining = torch.tensor([r.remaining for r in reqs], dtype=torch.long, device=device)
    stops = _stop_table(reqs).to(device)
    greedy = torch.tensor([r.params.greedy for r in reqs], device=device)
    for rows in (greedy.nonzero().flatten(), (~greedy).nonzero().flatten()):
        if rows.numel() == 0:
            continue
        if greedy[rows[0]]:
            target_predict = logits[rows].argmax(dim=-1)
            a, e, _ = ops.accept_greedy(candidates[rows], target_predict, remaining[rows], stops[rows])
        else:
            probs = torch.stack([probs_from_logits(logits[b], reqs[b].params) for b in rows.tolist()])
            # uniforms from the CPU generator: the same draws on every device
            u_accept = torch.rand(len(rows), L, generator=gen).to(device)
            u_sample = torch.rand(len(rows), generator=gen).to(device)
            a, e, _ = ops.accept_sampled(candidates[rows], probs, u_accept, u_sample,
                                         remaining[rows], stops[rows])
        accept_len[rows], emitted[rows] = a, e
    return accept_len, emitted


def generate_dflash(target, drafter, prompts: list[list[int]], params: list[SamplingParams],
                    ops: Ops, *, block_size: int | None = None, verify_width: int | None = None,
                    seed: int = 0) -> list[RequestResult]:
    """Speculative decoding of a batch of requests with a DFlash drafter: blocks of
    ``block_size`` (default: the drafter's), ``verify_width`` of them verified (default:
    all)."""
    L = block_size or drafter.cfg.block_size
    if L < 2:
        raise ValueError(f"block_size must be >= 2, got {L}")
    W = verify_width or L
    check_verify_width(W, L)
    gen = torch.Generator().manual_seed(seed)
    eos = tuple(target.config.eos_token_ids)
    target.set_capture_layers(drafter.cfg.target_layer_ids)
    # each request owns slots for every position it can reach: prompt + new tokens + a block
    spans = [len(pr) + p.max_new_tokens + L for pr, p in zip(prompts, params, strict=True)]
    pool = drafter.new_pool(sum(spans))
    bases = [sum(spans[:i]) for i in range(len(spans))]
    device = pool.k.device

    reqs = []
    for prompt, p, base in zip(prompts, params, bases):
        req = _Request(RequestResult(list(prompt)), p, p.stop_ids(eos), target.new_state(), base)
        features = _prefill(target, req, gen)
        positions = torch.arange(len(prompt), device=device)
        drafter.append_context(pool, features, positions, base + positions)
        reqs.append(req)

    while active := [r for r in reqs if not r.result.finish_reason]:
        candidates = draft_block(
            target, drafter, ops, pool,
            last=torch.tensor([r.result.tokens[-1] for r in active], device=device),
            start=torch.tensor([r.last_position for r in active], device=device),
            slot_base=torch.tensor([r.slot_base for r in active], device=device), L=L, W=W,
        )
        verified = [target.extend(r.state, candidates[b]) for b, r in enumerate(active)]
        logits = torch.stack([v.logits for v in verified])  # [B, W, V]
        accept_len, emitted = _accept(ops, active, candidates, logits, gen)
        for b, (req, out) in enumerate(zip(active, verified)):
            commit_len = int(accept_len[b]) + 1
            start = req.last_position
            target.commit(req.state, out.record, commit_len)
            positions = start + torch.arange(commit_len, device=device)
            drafter.append_context(pool, out.features[:commit_len], positions, req.slot_base + positions)
            req.result.commit_lens.append(commit_len)
            for token in emitted[b, :commit_len].tolist():
                _append_token(req, token)
    return [r.result for r in reqs]
