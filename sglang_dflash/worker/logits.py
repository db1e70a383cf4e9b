"""The logits of every verify block position, adjusted as the plain server adjusts a decode step's.

Plain decoding in SGLang 0.5.23 (``ModelRunner._preprocess_logits``, then
``Sampler._preprocess_logits``) adjusts the logits of the step that emits output token k,
given the output o_0 .. o_{k-1} (prompt tokens never count), in this order:

  1. additive penalties, summed in fp32 and added: -frequency_penalty x (occurrences of
     the token in the output, accumulated one occurrence at a time), -presence_penalty if
     it occurs, -inf on every stop token while k < min_new_tokens
  2. repetition penalty: an occurring token's logit divided by it (multiplied if < 0)
  3. the grammar's vocabulary mask
  4. logit_bias (the same at every step)
  5. custom logit processors, which may read the request (``__req__``) and its output

Block position j of a verify predicts output token m+1+j, where o_m is the bonus (the
block's column 0) and the candidates c_1..c_j stand for o_{m+1}..o_{m+j}: so the output
before position j is the request's output plus c_1..c_j, known before the verify, and
each position gets exactly the adjustment plain decoding would give it. Steps 1, 2 and 5
are applied here position by position, 3 and 4 by the worker (``_verify_logits``).

Note: under overlap scheduling SGLang's own plain server feeds its penalizers the output
one token late (``ScheduleBatch.cumulate_penalty_output_tokens`` reads ``output_ids[-1]``
before the last step was read back; the first decode step penalises the last prompt
token), so there its penalised greedy output differs from the same server with
``--disable-overlap-schedule``; this module follows the definition above, which is the
plain server without overlap.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from .history import OutputHistory


@dataclass(frozen=True)
class BlockPenalties:
    """Each batch row's penalties (None: no row of the batch uses that one)."""

    frequency: torch.Tensor | None  # [B] fp32
    presence: torch.Tensor | None  # [B] fp32
    repetition: torch.Tensor | None  # [B] fp32
    min_new_tokens: torch.Tensor | None  # [B] int64
    stop_mask: torch.Tensor | None  # [B, V] bool: the stop tokens min_new_tokens holds back
    prompt_lens: torch.Tensor  # [B] int64

    @property
    def needs_history(self) -> bool:
        return self.frequency is not None or self.presence is not None or self.repetition is not None

    def frequency_or_zero(self) -> torch.Tensor:
        return self.frequency if self.frequency is not None else torch.zeros_like(self.prompt_lens, dtype=torch.float32)


def _stop_ids(req) -> set[int]:
    """The tokens SGLang's min-new-tokens penalizer holds back for a request."""
    tokenizer = req.tokenizer
    ids = set(req.sampling_params.stop_token_ids or ()) | set(req.eos_token_ids or ())
    if tokenizer is not None:
        ids |= set(getattr(tokenizer, "additional_stop_token_ids", None) or ())
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def reads_output_history(params) -> bool:
    """Whether a request's penalties depend on its output so far (frequency, presence,
    repetition): such a request needs the history tables of ``OutputHistory``."""
    return bool(params.frequency_penalty or params.presence_penalty or params.repetition_penalty != 1.0)


def block_penalties(reqs, vocab: int, device) -> BlockPenalties | None:
    """The penalties of a batch's requests, or None when none asks for any (the common case)."""
    params = [r.sampling_params for r in reqs]
    freq = [p.frequency_penalty for p in params]
    pres = [p.presence_penalty for p in params]
    rep = [p.repetition_penalty for p in params]
    # a row already at its minimum output (the host count only lags the device's) needs no mask
    min_new = [p.min_new_tokens if p.min_new_tokens > len(r.output_ids) else 0 for p, r in zip(params, reqs)]
    if not (any(map(reads_output_history, params)) or any(min_new)):
        return None

    def row_tensor(values, dtype, used):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True) if used else None

    stop_mask = None
    if any(min_new):
        stop_mask = torch.zeros((len(reqs), vocab), dtype=torch.bool)
        for b, r in enumerate(reqs):
            ids = [i for i in _stop_ids(r) if 0 <= i < vocab] if min_new[b] else []
            stop_mask[b, ids] = True
        stop_mask = stop_mask.to(device, non_blocking=True)
    return BlockPenalties(
        frequency=row_tensor(freq, torch.float32, any(freq)),
        presence=row_tensor(pres, torch.float32, any(pres)),
        repetition=row_tensor(rep, torch.float32, any(x != 1.0 for x in rep)),
        min_new_tokens=row_tensor(min_new, torch.int64, any(min_new)),
        stop_mask=stop_mask,
        prompt_lens=torch.tensor([len(r.origin_input_ids) for r in reqs], dtype=torch.int64).to(device),
    )


def history_frequency(p: BlockPenalties | None) -> torch.Tensor | None:
    """[B] frequency penalties for ``OutputHistory.commit`` when the batch's penalties read
    the history tables (else None: the step leaves them alone)."""
    return p.frequency_or_zero() if p is not None and p.needs_history else None


def penalise_block(
    block: torch.Tensor,  # [B, L, V] verify logits, adjusted in place
    candidates: torch.Tensor,  # [B, L]; column 0 is the bonus, already in the output
    seq_lens: torch.Tensor,  # [B] committed lengths (prompt + output - 1)
    p: BlockPenalties,
    history: OutputHistory | None,  # needed when p.needs_history
    rows: torch.Tensor,  # [B] req_to_token rows of the batch
) -> None:
    """Steps 1 and 2 of the module docstring at every block position."""
    B, L, V = block.shape
    counts = acc = None
    if p.needs_history:
        counts, acc = history.block_rows(rows)
    # output tokens before position 0 (the bonus included)
    out_lens = seq_lens.to(torch.int64) - p.prompt_lens + 1
    ones = torch.ones((B, 1), dtype=torch.int32, device=block.device)
    frequency = p.frequency_or_zero()[:, None]
    for j in range(L):
        if j and counts is not None:
            token = candidates[:, j : j + 1]
            counts.scatter_add_(1, token, ones)
            acc.scatter_add_(1, token, frequency)
        logits = block[:, j]
        additive = torch.zeros((B, V), dtype=torch.float32, device=block.device)
        if p.frequency is not None:
            additive -= acc
        if p.min_new_tokens is not None:
            below = (out_lens + j < p.min_new_tokens)[:, None]
            additive.masked_fill_(below & p.stop_mask, float("-inf"))
        if p.presence is not None:
            additive -= torch.where(counts > 0, p.presence[:, None], 0.0)
        logits.add_(additive)
        if p.repetition is not None:
            scale = torch.where(counts > 0, p.repetition[:, None], 1.0)
            logits.copy_(torch.where(logits < 0, logits * scale, logits / scale))


class RequestSoFar:
    """A request as a custom logit processor sees it at one block position: its output is
    the output so far plus the candidates before that position; everything else is the
    request's own, read through (a processor is user code and may read any field)."""

    def __init__(self, req, output_ids: list[int]):
        self._req = req
        # the container SGLang uses (an int array), so that processors can concatenate it
        # with origin_input_ids as they do on the request itself
        own = req.output_ids
        self.output_ids = array(own.typecode, output_ids) if isinstance(own, array) else list(output_ids)
        self.origin_input_ids = req.origin_input_ids

    def __getattr__(self, name: str):
        return getattr(self._req, name)


def _params_at(params, req, output_ids: list[int]):
    if isinstance(params, dict) and "__req__" in params:
        return {**params, "__req__": RequestSoFar(req, output_ids)}
    return params


def apply_custom_processors(
    block: torch.Tensor,  # [B, L, V], adjusted in place
    sampling_info,
    reqs,
    outputs: list[list[int]],  # each request's output so far (bonus included)
    candidates: list[list[int]],  # [B][L] on the host
) -> None:
    """Step 5 at every block position, each processor called on its rows as the plain
    sampler calls it (``apply_custom_logit_processor``)."""
    L = block.shape[1]
    for entry in sampling_info.custom_logit_processor.values():
        for j in range(L):
            params = [_params_at(sampling_info.custom_params[b], reqs[b], outputs[b] + candidates[b][1 : j + 1])
                      for b in entry.rows]
            result = entry.processor(block[entry.indices, j], params)
            block[entry.indices, j] = result.to(block.dtype)
