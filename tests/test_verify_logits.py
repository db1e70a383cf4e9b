"""Per-position logit adjustments of a verify block (worker/logits.py, worker/history.py)
against SGLang 0.5.23's own plain-decoding pieces, bit for bit.

Plain decoding, step k: SGLang's penalizer orchestrator has been fed o_0..o_{k-1} one
token per step (``cumulate_output_tokens``), ``SamplingBatchInfo.update_penalties`` sums
its additive penalties and multiplies its scaling ones, and the logits get both. A verify
block starting after o_m must give block position j exactly the logits of plain step
m+1+j: that is checked here for frequency, presence, repetition and min_new_tokens,
alone and together, over several blocks with the commits in between.
"""

from __future__ import annotations

import types

import pytest
import torch

from sglang_dflash.worker.history import OutputHistory
from sglang_dflash.worker.logits import (
    RequestSoFar,
    apply_custom_processors,
    block_penalties,
    history_frequency,
    penalise_block,
)

V, L = 40, 4
EOS, STOP, EXTRA_STOP = 3, 5, 7


@pytest.fixture(scope="module")
def sgl():
    from sglang_env import require_sglang

    require_sglang()
    from array import array

    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling import penaltylib
    from sglang.srt.sampling.penaltylib.repetition_penalty import apply_scaling_penalties
    from sglang.srt.sampling.sampling_params import SamplingParams

    return types.SimpleNamespace(**locals())


class _Batch:
    """What the orchestrator reads of a ScheduleBatch (it holds it by weak reference)."""

    def __init__(self, reqs):
        self.reqs, self.device = reqs, "cpu"


def _req(sgl, i, prompt_len, **params):
    tokenizer = types.SimpleNamespace(additional_stop_token_ids={EXTRA_STOP}, eos_token_id=EOS)
    p = sgl.SamplingParams(max_new_tokens=64, stop_token_ids=[STOP], **params)
    p.normalize(tokenizer)
    req = sgl.Req(f"r{i}", "", sgl.array("i", [1] * prompt_len), p, eos_token_ids={EOS}, vocab_size=V)
    req.tokenizer = tokenizer
    return req


def _plain_step_logits(sgl, orchestrator, logits):
    """[B, V] logits of one plain decode step, as update_penalties + apply_logits_bias give them."""
    logits = logits.clone()
    additive = torch.zeros_like(logits)
    orchestrator.accumulate_additive_penalties(additive)
    logits.add_(additive)
    scaling = orchestrator.accumulate_scaling_penalties()
    if scaling is not None:
        sgl.apply_scaling_penalties(logits, scaling)
    return logits


PENALTIES = {
    "frequency": [dict(frequency_penalty=0.3), dict(frequency_penalty=-0.7)],
    "presence": [dict(presence_penalty=0.9), dict(presence_penalty=0.1)],
    "repetition": [dict(repetition_penalty=1.3), dict(repetition_penalty=0.8)],
    "min-new": [dict(min_new_tokens=6), dict(min_new_tokens=2)],
    "all-and-none": [dict(frequency_penalty=0.4, presence_penalty=0.6, repetition_penalty=1.2, min_new_tokens=9),
                     dict()],
}


@pytest.mark.parametrize("case", list(PENALTIES), ids=list(PENALTIES))
def test_block_positions_get_the_plain_steps_penalties(sgl, case):
    torch.manual_seed(len(case))
    T = 16  # output tokens o_0..o_15 per request; blocks of L = 4 commit 3 tokens each
    reqs = [_req(sgl, b, prompt_len=5 + b, **params) for b, params in enumerate(PENALTIES[case])]
    B = len(reqs)
    outputs = torch.randint(0, 12, (B, T))  # a small alphabet: tokens repeat
    step_logits = torch.randn(T, B, V) * 3

    # plain decoding: step k sees o_0..o_{k-1}
    batch = _Batch(reqs)
    orchestrator = sgl.penaltylib.BatchedPenalizerOrchestrator(
        vocab_size=V, batch=batch, penalizers={sgl.penaltylib.BatchedFrequencyPenalizer,
                                               sgl.penaltylib.BatchedMinNewTokensPenalizer,
                                               sgl.penaltylib.BatchedPresencePenalizer,
                                               sgl.penaltylib.BatchedRepetitionPenalizer})
    plain = []
    for k in range(T):
        plain.append(_plain_step_logits(sgl, orchestrator, step_logits[k]))
        orchestrator.cumulate_output_tokens(outputs[:, k])

    # the worker: o_0 from the extend, then blocks [o_m, o_{m+1} .. o_{m+3}] committing 3
    rows = torch.tensor([3, 0])  # req_to_token rows
    history = OutputHistory(rows=4, block_size=L, device="cpu")
    freq = torch.tensor([r.sampling_params.frequency_penalty for r in reqs])
    history.start(rows, outputs[:, 0], [[], []], freq, need_tables=True, vocab=V)
    m, checked = 0, 0
    while m + L < T:
        for r in reqs:  # the host has read back o_0..o_m
            r.output_ids = list(outputs[reqs.index(r), : m + 1].tolist())
        # None once every minimum is reached and nothing else is asked for
        p = block_penalties(reqs, V, "cpu")
        block = step_logits[m + 1 : m + 1 + L].transpose(0, 1).clone()  # [B, L, V]
        seq_lens = torch.tensor([len(r.origin_input_ids) + m for r in reqs])
        if p is not None:
            penalise_block(block, outputs[:, m : m + L], seq_lens, p, history, rows)
        for j in range(L):
            assert torch.equal(block[:, j], plain[m + 1 + j]), f"{case}: block at o_{m}, position {j}"
            checked += 1
        commit = torch.full((B,), 3, dtype=torch.int32)
        emitted = torch.cat([outputs[:, m + 1 : m + 4], torch.full((B, 1), -1)], dim=1)
        history.commit(rows, emitted, commit, history_frequency(p))
        m += 3
    assert checked == 16

    # not vacuous: the per-position penalties differ from one penalty broadcast over the block
    if case != "min-new":
        block = step_logits[1 : 1 + L].transpose(0, 1).clone()
        broadcast = block.clone()
        history.start(rows, outputs[:, 0], [[], []], freq, need_tables=True, vocab=V)
        for r in reqs:
            r.output_ids = [int(outputs[reqs.index(r), 0])]
        p = block_penalties(reqs, V, "cpu")
        seq_lens = torch.tensor([len(r.origin_input_ids) for r in reqs])
        penalise_block(block, outputs[:, :L], seq_lens, p, history, rows)
        penalise_block(broadcast, outputs[:, :1].expand(B, L), seq_lens.clone(), p, history, rows)
        assert not torch.equal(block[:, 1:], broadcast[:, 1:])


def test_min_new_tokens_masks_every_stop_token_below_the_minimum(sgl):
    req = _req(sgl, 0, prompt_len=4, min_new_tokens=3)
    req.output_ids = [9]
    p = block_penalties([req], V, "cpu")
    block = torch.zeros(1, L, V)
    # output so far: 1 token (the bonus); positions 0, 1 emit tokens 2 and 3 (< 3): masked
    penalise_block(block, torch.tensor([[9, 1, 2, 4]]), torch.tensor([4]), p, None, torch.tensor([0]))
    stops = [EOS, STOP, EXTRA_STOP]
    assert torch.isinf(block[0, :2, stops]).all() and torch.isfinite(block[0, 2:]).all()
    assert torch.isfinite(block[0, :2]).sum() == 2 * (V - 3)
    # once the host has seen the minimum, nothing is left to mask
    req.output_ids = [9, 1, 2]
    assert block_penalties([req], V, "cpu") is None


def test_retracted_request_restarts_with_its_earlier_output():
    history = OutputHistory(rows=2, block_size=L, device="cpu")
    history.start(torch.tensor([1]), torch.tensor([6]), [[4, 4, 2]], torch.tensor([0.5]), True, V)
    counts, acc = history.block_rows(torch.tensor([1]))
    assert counts[0, [2, 4, 6]].tolist() == [1, 2, 1] and int(counts.sum()) == 4
    assert acc[0, [2, 4, 6]].tolist() == [0.5, 1.0, 0.5]


def test_outputs_so_far_add_the_step_the_host_has_not_read():
    history = OutputHistory(rows=3, block_size=L, device="cpu")
    history.start(torch.tensor([2]), torch.tensor([11]), [[]], torch.zeros(1), False, V)
    history.commit(torch.tensor([2]), torch.tensor([[12, 13, -1, -1]]), torch.tensor([2]), None)
    req = types.SimpleNamespace(rid="r", origin_input_ids=[1, 1, 1], output_ids=[11])
    # committed 3 + 3 tokens: o_0..o_2 on the device, o_0 on the host
    assert history.outputs_so_far([req], torch.tensor([2]), torch.tensor([5])) == [[11, 12, 13]]
    req.output_ids = [11, 12, 13]
    assert history.outputs_so_far([req], torch.tensor([2]), torch.tensor([5])) == [[11, 12, 13]]
    req.output_ids = []
    with pytest.raises(RuntimeError, match="more apart than its last step"):
        history.outputs_so_far([req], torch.tensor([2]), torch.tensor([5]))


class _BanLastToken:
    """A custom processor that depends on the output so far: no token twice in a row."""

    def __call__(self, logits, params):
        for i, p in enumerate(params):
            logits[i, p["__req__"].output_ids[-1]] = -float("inf")
        return logits


def test_custom_processors_see_the_output_before_each_position():
    req = types.SimpleNamespace(origin_input_ids=[1, 2], output_ids=[7], rid="r")
    params = {"__req__": req, "x": 1}
    entry = types.SimpleNamespace(processor=_BanLastToken(), rows=[1], indices=torch.tensor([1]))
    info = types.SimpleNamespace(custom_logit_processor={0: entry}, custom_params=[None, params])
    block = torch.zeros(2, L, V)
    candidates = [[0, 0, 0, 0], [7, 8, 9, 10]]
    apply_custom_processors(block, info, [None, req], [[], [5, 7]], candidates)
    assert torch.isfinite(block[0]).all()
    # position j bans the last output before it: 7 (the bonus), then the candidates 8, 9, 10
    for j, banned in enumerate([7, 8, 9, 10]):
        assert torch.isinf(block[1, j]).nonzero().flatten().tolist() == [banned]
    seen = RequestSoFar(req, [5, 7, 8])
    assert seen.output_ids == [5, 7, 8] and seen.origin_input_ids == [1, 2] and seen.rid == "r"
    # SGLang keeps token ids in int arrays; processors concatenate them
    from array import array

    req = types.SimpleNamespace(origin_input_ids=array("i", [1, 2]), output_ids=array("i", [7]))
    seen = RequestSoFar(req, [7, 8])
    assert seen.origin_input_ids + seen.output_ids == array("i", [1, 2, 7, 8])
