"""The DFlash worker: its steps against the reference loop, its results through SGLang's code.

Runs on CPU: the worker's tensor steps (``worker_steps``), its start-up refusals, and
``DFlashWorker.forward_batch_generation`` itself (prefill, decode steps, a radix prefix
hit, the call that commits a hybrid target's linear state), driven by a small scheduler
built from SGLang's real ``ReqToTokenPool``, token allocator, ``Req``,
``DFlashDraftInputV2``, ``GenerationBatchResult`` and result processing
(``_resolve_spec_v2_tokens``, ``Req.update_finish_state``), with the reference target
behind the worker's target door (the members of ``SGLangTarget``). Not run here:
``SGLangTarget`` itself (SGLang's verify ForwardBatch, the ModelRunner forwards,
``update_mamba_state_after_mtp_verify``), overlap timing, tensor parallelism.
"""

from __future__ import annotations

import pytest
import torch

from sglang_dflash.backend import get_ops
from sglang_dflash.reference.sampling import SamplingParams
from sglang_dflash.sampling import TOP_K_ALL, RowSampling
from sglang_dflash.worker.settings import ServerSettings, worker_config
from sglang_dflash.worker.steps import (
    accept_block,
    block_inputs,
    extend_positions,
    mamba_steps_to_track,
    spec_outputs,
)

OPS = get_ops("torch")


# ---- tensor steps ----


def test_extend_positions_ragged():
    got = extend_positions([0, 5, 3, 0], [3, 2, 0, 1], "cpu")
    assert torch.equal(got, torch.tensor([0, 1, 2, 5, 6, 0]))
    with pytest.raises(ValueError, match="extend_lens"):
        extend_positions([0, 1], [2], "cpu")


def test_block_inputs_read_the_reserved_slots():
    req_to_token = (torch.arange(4 * 40).view(4, 40) + 1000).to(torch.int32)
    block_ids, positions, cache_loc = block_inputs(
        bonus=torch.tensor([11, 12]), seq_lens=torch.tensor([5, 17]),
        req_pool_indices=torch.tensor([2, 0]), req_to_token=req_to_token, mask_token_id=99, block_size=4,
        verify_width=4)
    assert torch.equal(block_ids, torch.tensor([[11, 99, 99, 99], [12, 99, 99, 99]]))
    assert torch.equal(positions, torch.tensor([[5, 6, 7, 8], [17, 18, 19, 20]]))
    assert torch.equal(cache_loc, torch.tensor([[1085, 1086, 1087, 1088], [1017, 1018, 1019, 1020]]))
    assert cache_loc.dtype == torch.int64
    # draft the whole block, verify (and take slots for) its first 2 positions only
    block_ids, positions, cache_loc = block_inputs(
        bonus=torch.tensor([11, 12]), seq_lens=torch.tensor([5, 17]),
        req_pool_indices=torch.tensor([2, 0]), req_to_token=req_to_token, mask_token_id=99, block_size=4,
        verify_width=2)
    assert block_ids.shape == positions.shape == (2, 4)
    assert torch.equal(cache_loc, torch.tensor([[1085, 1086], [1017, 1018]]))
    with pytest.raises(ValueError, match=r"verify width 5 must lie in 2\.\.4"):
        block_inputs(torch.tensor([1]), torch.tensor([0]), torch.tensor([0]), req_to_token, 99, 4, 5)


def test_accept_block_greedy_scenarios():
    # row 0: drafts 5, 6 match, 7 does not -> accept 2, bonus = target's 9 after 6
    # row 1: first draft wrong -> accept 0, bonus 4
    # row 2: every draft right -> accept 3, bonus = target's last prediction 8
    candidates = torch.tensor([[1, 5, 6, 7], [2, 3, 3, 3], [0, 1, 2, 3]])
    target_predict = torch.tensor([[5, 6, 9, 2], [4, 0, 0, 0], [1, 2, 3, 8]])
    logits = torch.nn.functional.one_hot(target_predict, 10).float()
    accept_len, emitted = accept_block(OPS, candidates, logits, None, None)
    assert torch.equal(accept_len, torch.tensor([2, 0, 3]))
    assert torch.equal(emitted, torch.tensor([[5, 6, 9, -1], [4, -1, -1, -1], [1, 2, 3, 8]]))


def test_accept_block_sampled_rows_follow_the_target_and_greedy_rows_stay_greedy():
    """Distribution test: sampled rows accept draft d with p(d) and otherwise draw from
    p without d; greedy rows of the same batch take the argmax."""
    torch.manual_seed(0)
    n, V = 4000, 4
    p = torch.tensor([0.1, 0.3, 0.4, 0.2])
    logits = p.log().expand(n, 2, V).clone()
    candidates = torch.tensor([0, 1]).expand(n, 2).clone()  # the draft is token 1
    greedy = torch.arange(n) % 4 == 0
    rows = RowSampling(torch.ones(n), torch.where(greedy, 1, TOP_K_ALL), torch.ones(n), torch.zeros(n))
    accept_len, emitted = accept_block(OPS, candidates, logits, rows, greedy)
    # greedy: argmax is token 2, the draft 1 is rejected, bonus 2
    assert torch.equal(accept_len[greedy], torch.zeros(int(greedy.sum()), dtype=torch.int64))
    assert (emitted[greedy, 0] == 2).all()
    sampled = ~greedy
    accepted = accept_len[sampled] == 1
    assert abs(accepted.float().mean().item() - 0.3) < 0.03
    rejected_first = emitted[sampled][~accepted, 0]
    freq = torch.bincount(rejected_first, minlength=V).float() / len(rejected_first)
    want = torch.tensor([0.1, 0.0, 0.4, 0.2]) / 0.7
    assert (freq - want).abs().max() < 0.04, freq


def test_spec_outputs_as_the_scheduler_reads_them():
    out = spec_outputs(torch.tensor([2, 0]), torch.tensor([[7, 8, 9, -1], [5, -1, -1, -1]]), torch.tensor([10, 4]))
    assert torch.equal(out.next_token_ids, torch.tensor([7, 8, 9, 0, 5, 0, 0, 0]))
    assert torch.equal(out.commit_lens, torch.tensor([3, 1], dtype=torch.int32))
    assert torch.equal(out.bonus, torch.tensor([9, 5]))
    assert torch.equal(out.new_seq_lens, torch.tensor([13, 5]))


def test_mamba_steps_to_track_hand_cases():
    # (pre, commit) with interval 8 -> step whose state is checkpointed, -1 for none
    cases = [((6, 4), 1), ((6, 1), -1), ((7, 1), 0), ((2, 2), -1), ((15, 16), 8), ((8, 3), -1), ((5, 2), -1)]
    pre = torch.tensor([c[0][0] for c in cases])
    commit = torch.tensor([c[0][1] for c in cases], dtype=torch.int32)
    got = mamba_steps_to_track(pre, pre + commit, commit, interval=8)
    assert torch.equal(got, torch.tensor([c[1] for c in cases]))


# ---- start-up configuration ----


def _settings(**overrides) -> ServerSettings:
    base = dict(drafter_path="drafter", verify_width=16, device="cuda:0", tp_size=1, pp_size=1,
                dp_attention=False, topk=None, draft_window_size=None, hierarchical_cache=False,
                disaggregation_mode="null", unified_memory=False, lora=False, adaptive=False, ops_env=None)
    return ServerSettings(**{**base, **overrides})


def test_worker_config_defaults_and_backend_choice():
    cfg = worker_config(_settings())
    assert (cfg.drafter_path, cfg.verify_width, cfg.op_backend, cfg.tp_size) == ("drafter", 16, "triton", 1)
    assert worker_config(_settings(device="cpu")).op_backend == "torch"
    assert worker_config(_settings(ops_env="torch", topk=1)).op_backend == "torch"
    assert worker_config(_settings()).sampling_backend == "pytorch"
    assert worker_config(_settings(sampling_backend="flashinfer")).sampling_backend == "flashinfer"


def test_worker_config_refuses_every_unsupported_setting_at_once():
    bad = dict(drafter_path=None, verify_width=1, pp_size=2, dp_attention=True, topk=4, draft_window_size=512,
               hierarchical_cache=True, disaggregation_mode="decode", unified_memory=True, lora=True,
               adaptive=True, ops_env="cuda", sampling_backend="ascend")
    with pytest.raises(ValueError) as err:
        worker_config(_settings(**bad))
    message = str(err.value)
    for needle in ("--speculative-draft-model-path", "--speculative-num-draft-tokens", "--pp-size 2",
                   "--enable-dp-attention", "--speculative-eagle-topk must be 1, got 4",
                   "--speculative-draft-window-size", "--enable-hierarchical-cache",
                   "--disaggregation-mode decode", "--enable-unified-memory", "--enable-lora",
                   "--speculative-adaptive", "SGLANG_DFLASH_OPS='cuda'", "--sampling-backend ascend"):
        assert needle in message, needle
    assert message.count("\n  - ") == len(bad)


def test_acceptance_counter_by_hand():
    from sglang_dflash.worker.stats import AcceptanceCounter

    counter = AcceptanceCounter(4)
    counter.add([0, 3, 1])
    counter.add([1])
    report = counter.report(block_size=16)
    assert report["accepted_drafts_histogram"] == [1, 2, 0, 1]
    # commit lengths 1, 4, 2, 2: draft 1 accepted in 3 of 4 steps, draft 2 and 3 in 1
    assert report["commit_len_counts"] == [0, 1, 2, 0, 1]
    assert report["position_accept_rate"] == [0.75, 0.25, 0.25] and report["tau"] == 9 / 4
    with pytest.raises(ValueError, match=r"0\.\.3 at verify width 4, got 4"):
        counter.add([4])


# ---- the worker inside a small SGLang scheduler loop ----
#
# SGLang imports run once per module (they take tens of seconds on CPU); the reference
# pair is the bundled tiny Kimi-Linear-shaped target and its trained drafter.


@pytest.fixture(scope="module")
def sgl():
    """The SGLang names the scheduler loop below uses, imported on a CPU-only machine."""
    from sglang_env import require_sglang

    require_sglang()
    from array import array
    from types import SimpleNamespace

    from sglang.srt.layers.logits_processor import LogitsProcessorOutput
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor
    from sglang.srt.managers.utils import GenerationBatchResult
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLSamplingParams

    return SimpleNamespace(**locals())


@pytest.fixture(scope="module")
def pair():
    from sglang_dflash.reference.demo import use_ops
    from sglang_dflash.reference.tiny_pair import load_tiny_pair

    target, drafter = load_tiny_pair()
    use_ops(target, drafter, OPS)
    return target, drafter


class ReferenceTarget:
    """The reference target behind the worker's target door, with SGLang's KV semantics:
    a verify computes the whole block from the committed state, and the committed lengths
    (``seq_lens``) decide how much of it the next step builds on. In ``linear_state`` mode
    nothing counts until the worker commits it (SGLang's hybrid linear-attention path)."""

    def __init__(self, sgl, ref, req_to_token_pool, linear_state: bool, capture_ids):
        self.sgl, self.ref, self.req_pool, self.linear_state = sgl, ref, req_to_token_pool, linear_state
        ref.set_capture_layers(capture_ids)
        self.embed_tokens = ref.model.embed_tokens
        self.lm_head_weight, self.vocab_start = ref.lm_head.weight, 0
        self.states = {}  # request row -> reference state
        self.pending = {}  # request row -> (record of its last verify, committed length before it)
        self.slot_tokens = {}  # slot -> token written there, to rebuild a radix-hit prefix
        self.commits = []  # last_steps of every commit_linear_state call

    @property
    def req_to_token(self):
        return self.req_pool.req_to_token

    def has_linear_state(self) -> bool:
        return self.linear_state

    def _result(self, logits, features, next_token_ids=None):
        out = self.sgl.LogitsProcessorOutput(next_token_logits=logits, hidden_states=features)
        return self.sgl.GenerationBatchResult(logits_output=out, next_token_ids=next_token_ids,
                                              can_run_cuda_graph=False)

    def _state_for(self, row: int, prefix_len: int):
        if prefix_len == 0 or row not in self.states:
            # a fresh request row, possibly over a radix-cached prefix of another request
            self.states[row] = state = self.ref.new_state()
            if prefix_len:
                slots = self.req_to_token[row, :prefix_len].tolist()
                prefix = torch.tensor([self.slot_tokens[s] for s in slots])
                self.ref.commit(state, self.ref.extend(state, prefix).record, prefix_len)
        return self.states[row]

    def extend(self, batch):
        logits, features, first = [], [], []
        start = 0
        for i, row in enumerate(batch.req_pool_indices.tolist()):
            n = batch.extend_lens[i]
            tokens, slots = batch.input_ids[start:start + n], batch.out_cache_loc[start:start + n]
            start += n
            state = self._state_for(row, batch.prefix_lens[i])
            out = self.ref.extend(state, tokens)
            self.ref.commit(state, out.record, n)
            self.slot_tokens.update(zip(slots.tolist(), tokens.tolist()))
            logits.append(out.logits[-1])
            features.append(out.features)
            first.append(int(out.logits[-1].argmax()))
        return self._result(torch.stack(logits), torch.cat(features), torch.tensor(first))

    def verify(self, batch, candidates, positions, cache_loc):
        B, L = candidates.shape
        logits, features = [], []
        for b, row in enumerate(batch.req_pool_indices.tolist()):
            P = int(batch.seq_lens[b])
            assert torch.equal(positions[b], P + torch.arange(L))
            assert torch.equal(cache_loc[b], self.req_to_token[row, P:P + L].long())
            state = self.states[row]
            if row in self.pending:
                assert not self.linear_state, "the worker did not commit the linear state of the last verify"
                record, base = self.pending.pop(row)
                self.ref.commit(state, record, P - base)
            out = self.ref.extend(state, candidates[b])
            self.pending[row] = (out.record, P)
            self.slot_tokens.update(zip(cache_loc[b].tolist(), candidates[b].tolist()))
            logits.append(out.logits)
            features.append(out.features)
        return self._result(torch.cat(logits), torch.cat(features))

    def commit_linear_state(self, batch, last_steps, steps_to_track):
        assert steps_to_track is None
        self.commits.append(last_steps.clone())
        for b, row in enumerate(batch.req_pool_indices.tolist()):
            record, _ = self.pending.pop(row)
            self.ref.commit(self.states[row], record, int(last_steps[b]) + 1)


class MiniScheduler:
    """What SGLang's scheduler does around the worker, with SGLang's own pieces: request
    rows and KV slots from its pools, two blocks of slots reserved ahead of each request,
    results read back by its ``_resolve_spec_v2_tokens`` and trimmed by
    ``Req.update_finish_state``, the draft input filtered by ``DFlashDraftInputV2``."""

    def __init__(self, sgl, pair, verify_width: int, linear_state: bool = False, num_slots: int = 4096):
        from sglang_dflash.worker.dflash_worker import DFlashWorker
        from sglang_dflash.worker.settings import WorkerConfig

        # L in this class is what SGLang reserves by: speculative_num_draft_tokens = W
        self.sgl, self.L = sgl, verify_width
        self.step_accept_lens = []
        target, drafter = pair
        self.eos = target.config.eos_token_ids[0]
        self.vocab = target.lm_head.weight.shape[0]
        self.req_pool = sgl.ReqToTokenPool(size=16, max_context_len=512, device="cpu", enable_memory_saver=False)
        self.allocator = sgl.TokenToKVPoolAllocator(num_slots, torch.float32, "cpu", None, need_sort=False)
        self.target = ReferenceTarget(sgl, target, self.req_pool, linear_state, drafter.cfg.target_layer_ids)
        cfg = WorkerConfig(drafter_path="tiny-dflash", verify_width=verify_width, op_backend="torch", tp_size=1)
        self.worker = DFlashWorker.from_parts(target_worker=None, cfg=cfg, drafter=drafter, target=self.target)
        self.worker.alloc_memory_pool(None, self.req_pool, self.allocator)
        self.worker.init_attention_backends()
        self.processor = sgl.SimpleNamespace(
            metrics_reporter=sgl.SimpleNamespace(snapshot_spec_decode_metrics=lambda batch, result: None),
            model_worker=self.worker, advance_grammar_fsm=lambda result, batch: None)

    def new_req(self, i: int, prompt: list[int], max_new: int, temperature: float = 0.0):
        params = self.sgl.SGLSamplingParams(max_new_tokens=max_new, temperature=temperature)
        params.normalize(None)
        req = self.sgl.Req(f"r{i}", "", self.sgl.array("i", prompt), params, eos_token_ids={self.eos},
                           vocab_size=self.vocab)
        req.commit_lens = []
        return req

    def _sampling_info(self, reqs):
        if all(r.sampling_params.top_k <= 1 for r in reqs):
            return None
        p = [r.sampling_params for r in reqs]
        return self.sgl.SamplingBatchInfo(
            temperatures=torch.tensor([x.temperature for x in p]).view(-1, 1),
            top_ps=torch.tensor([x.top_p for x in p]), top_ks=torch.tensor([x.top_k for x in p]),
            min_ps=torch.tensor([x.min_p for x in p]), is_all_greedy=False,
            is_any_greedy=any(x.top_k <= 1 for x in p), need_top_p_sampling=any(x.top_p < 1 for x in p),
            need_top_k_sampling=True, need_min_p_sampling=False, vocab_size=self.vocab, device="cpu")

    def prefill(self, reqs, prefixes=None):
        """One extend batch; ``prefixes[i]`` = (slots, length) of a radix-cached prefix."""
        prefixes = prefixes or [None] * len(reqs)
        assert self.req_pool.alloc(reqs) is not None
        rows, prefix_lens, extend_lens, input_ids, out_cache_loc = [], [], [], [], []
        for req, prefix in zip(reqs, prefixes):
            row, prompt = req.kv.req_pool_idx, list(req.origin_input_ids)
            P = 0 if prefix is None else prefix[1]
            if P:
                self.req_pool.write((row, slice(0, P)), prefix[0][:P].to(torch.int32))
            slots = self.allocator.alloc(len(prompt) - P)
            self.req_pool.write((row, slice(P, len(prompt))), slots.to(torch.int32))
            req.allocated = len(prompt)
            rows.append(row)
            prefix_lens.append(P)
            extend_lens.append(len(prompt) - P)
            input_ids.append(torch.tensor(prompt[P:]))
            out_cache_loc.append(slots)
        batch = self.sgl.SimpleNamespace(
            forward_mode=self.sgl.ForwardMode.EXTEND, is_extend_in_batch=False, input_ids=torch.cat(input_ids),
            out_cache_loc=torch.cat(out_cache_loc), prefix_lens=prefix_lens, extend_lens=extend_lens,
            seq_lens=torch.tensor([len(r.origin_input_ids) for r in reqs]), req_pool_indices=torch.tensor(rows),
            sampling_info=self._sampling_info(reqs), reqs=reqs)
        result = self.worker.forward_batch_generation(batch)
        assert result.logits_output.hidden_states is None
        for req, token in zip(reqs, result.next_token_ids.tolist()):
            req.kv.kv_committed_len = len(req.origin_input_ids)
            req.output_ids.append(token)
            req.update_finish_state()
        return result.next_draft_input

    def _reserve(self, req, seq_len: int) -> None:
        """Slots for positions seq_len .. seq_len + 2L - 1, as prepare_for_decode keeps them."""
        need = seq_len + 2 * self.L - req.allocated
        if need > 0:
            slots = self.allocator.alloc(need)
            self.req_pool.write((req.kv.req_pool_idx, slice(req.allocated, req.allocated + need)),
                                slots.to(torch.int32))
            req.allocated += need

    def decode(self, reqs, draft_input):
        """Decode steps until every request finishes; returns the number of steps."""
        active, steps = list(range(len(reqs))), 0
        while active := self._keep_running(reqs, active, draft_input):
            batch_reqs = [reqs[i] for i in active]
            seq_lens = draft_input.new_seq_lens.clone()
            for req, n in zip(batch_reqs, seq_lens.tolist()):
                self._reserve(req, n)
            batch = self.sgl.SimpleNamespace(
                forward_mode=self.sgl.ForwardMode.DECODE, is_extend_in_batch=False, seq_lens=seq_lens,
                seq_lens_cpu=seq_lens.clone(), seq_lens_sum=int(seq_lens.sum()),
                req_pool_indices=torch.tensor([r.kv.req_pool_idx for r in batch_reqs]), spec_info=draft_input,
                sampling_info=self._sampling_info(batch_reqs), return_logprob=False, has_grammar=False,
                mamba_track_indices=None, reqs=batch_reqs, out_cache_loc=None)
            published = []
            result = self.worker.forward_batch_generation(batch, on_publish=published.append)
            assert len(published) == 1 and published[0] is result.new_seq_lens
            assert result.logits_output.hidden_states is None
            tokens = self.sgl.SchedulerBatchResultProcessor._resolve_spec_v2_tokens(self.processor, result, batch)
            for req, run, n in zip(batch_reqs, tokens, result.accept_lens.tolist()):
                assert len(run) == n
                req.commit_lens.append(n)
                req.output_ids.extend(run)
                req.update_finish_state(len(run))
            self.step_accept_lens.append(result.accept_lens.clone())
            draft_input = result.next_draft_input
            steps += 1
        return steps

    def _keep_running(self, reqs, active, draft_input):
        keep = [j for j, i in enumerate(active) if not reqs[i].finished()]
        if len(keep) < len(active):
            draft_input.filter_batch(torch.tensor(keep, dtype=torch.int64))
        return [active[j] for j in keep]

    def serve(self, prompts, max_new, temperature=0.0):
        reqs = [self.new_req(i, p, n, temperature) for i, (p, n) in enumerate(zip(prompts, max_new))]
        self.decode(reqs, self.prefill(reqs))
        return reqs


def _tokens(req) -> list[int]:
    """The request's output as SGLang streams it: trimmed at its finish."""
    return list(req.output_ids[: req.finished_len or len(req.output_ids)])


PROMPT_TEXTS = ("", "count: 3 4 5 6", "12+7=19; 30+4=", "a red fox runs to the")
MAX_NEW = [24, 7, 16, 10]  # ragged prompts (just BOS .. 22 bytes), several stop mid-block


@pytest.fixture(scope="module")
def reference(pair):
    """Plain greedy decoding (the ground truth) and the reference DFlash loop, L = 16."""
    from sglang_dflash.reference.loop import generate_dflash, generate_plain
    from sglang_dflash.reference.tiny_pair import encode

    target, drafter = pair
    prompts = [encode(t) for t in PROMPT_TEXTS]
    params = [SamplingParams(max_new_tokens=n) for n in MAX_NEW]
    return prompts, generate_plain(target, prompts, params), generate_dflash(target, drafter, prompts, params, OPS)


@pytest.mark.parametrize("linear_state", [False, True], ids=["attention-target", "linear-state-target"])
def test_worker_serves_the_reference_tokens(sgl, pair, reference, linear_state):
    prompts, plain, spec = reference
    sched = MiniScheduler(sgl, pair, 16, linear_state)
    reqs = sched.serve(prompts, MAX_NEW)
    for req, p, s in zip(reqs, plain, spec):
        assert _tokens(req) == p.tokens
        assert req.spec_verify_ct == len(req.commit_lens)
        assert req.kv.kv_committed_len == len(req.origin_input_ids) + sum(req.commit_lens)
        assert all(1 <= n <= 16 for n in req.commit_lens)
        # the same blocks as the reference loop, step for step; only the last step may
        # differ, where the reference cuts the accepted run at the stop and SGLang trims it
        assert req.commit_lens[:-1] == s.commit_lens[:-1]
    tau = sum(sum(r.commit_lens) for r in reqs) / sum(len(r.commit_lens) for r in reqs)
    assert tau > 2.0, f"acceptance {tau:.2f}: the worker's drafts do not follow the trained drafter"
    if linear_state:
        # one commit per verify, keeping commit_len block steps of every request
        assert len(sched.target.commits) == len(sched.step_accept_lens)
        for last_steps, accept_lens in zip(sched.target.commits, sched.step_accept_lens):
            assert torch.equal(last_steps + 1, accept_lens.to(torch.int64))


@pytest.mark.parametrize("W", [4, 9], ids=["L16-W4", "L16-W9"])
def test_worker_verify_width_follows_the_reference_loop(sgl, pair, reference, W):
    """Draft the trained 16, verify W: plain decoding's tokens, the reference loop's steps
    at W, SGLang's result stride W, and the counts /server_info shows."""
    from sglang_dflash.reference.loop import generate_dflash

    prompts, plain, _ = reference
    target, drafter = pair
    params = [SamplingParams(max_new_tokens=n) for n in MAX_NEW]
    spec = generate_dflash(target, drafter, prompts, params, OPS, verify_width=W)
    sched = MiniScheduler(sgl, pair, W)
    reqs = sched.serve(prompts, MAX_NEW)
    for req, p, s in zip(reqs, plain, spec):
        assert _tokens(req) == p.tokens
        assert all(1 <= n <= W for n in req.commit_lens)
        assert req.commit_lens[:-1] == s.commit_lens[:-1]
    assert any(n == W for r in reqs for n in r.commit_lens), "no step used the whole verify width"
    report = sched.worker.acceptance_report()
    assert (report["block_size"], report["verify_width"]) == (16, W)
    accepted = torch.cat(sched.step_accept_lens).to(torch.int64) - 1
    assert report["accepted_drafts_histogram"] == torch.bincount(accepted, minlength=W).tolist()
    # SGLang's per-request histograms count the same steps (finished rows leave the batch here)
    summed = [sum(r.spec_correct_drafts_histogram[i] for r in reqs if i < len(r.spec_correct_drafts_histogram))
              for i in range(W)]
    assert summed == report["accepted_drafts_histogram"]
    assert report["steps"] == sum(len(r.commit_lens) for r in reqs)
    assert len(report["position_accept_rate"]) == W - 1


def test_radix_prefix_hit_reuses_the_draft_context(sgl, pair):
    """A prompt that extends a finished request's prompt reuses its KV slots (a radix hit):
    the worker finds the draft context there and drafts the same blocks as without the hit."""
    from sglang_dflash.reference.tiny_pair import encode

    first_prompt = encode("12+7=19; 30+4=")
    second_prompt = first_prompt + list(b"34; 5+")
    cold = MiniScheduler(sgl, pair, 16).serve([second_prompt], [20])[0]

    sched = MiniScheduler(sgl, pair, 16)
    first = sched.serve([first_prompt], [2])[0]
    prefix_slots = sched.req_pool.req_to_token[first.kv.req_pool_idx, : len(first_prompt)].clone()
    hit = sched.new_req(1, second_prompt, 20)
    sched.decode([hit], sched.prefill([hit], prefixes=[(prefix_slots, len(first_prompt))]))
    assert _tokens(hit) == _tokens(cold)
    assert hit.commit_lens == cold.commit_lens
    # drafts were accepted, so the blocks depended on the draft context
    assert max(hit.commit_lens) >= 3, hit.commit_lens


def test_mixed_greedy_and_sampled_batch(sgl, pair, reference):
    prompts, plain, _ = reference
    sched = MiniScheduler(sgl, pair, 16)
    reqs = [sched.new_req(0, prompts[1], MAX_NEW[1]), sched.new_req(1, prompts[2], 12, temperature=0.8)]
    torch.manual_seed(0)
    sched.decode(reqs, sched.prefill(reqs))
    # the greedy request of a mixed batch stays exactly greedy
    assert _tokens(reqs[0]) == plain[1].tokens
    tokens = _tokens(reqs[1])
    assert 1 <= len(tokens) <= 12 and all(0 <= t < sched.vocab for t in tokens)
    assert reqs[1].kv.kv_committed_len == len(reqs[1].origin_input_ids) + sum(reqs[1].commit_lens)


def test_idle_batch_and_missing_features(sgl, pair):
    sched = MiniScheduler(sgl, pair, 16)
    idle = sgl.SimpleNamespace(forward_mode=sgl.ForwardMode.IDLE, is_extend_in_batch=False)
    published = []
    result = sched.worker.forward_batch_generation(idle, on_publish=published.append)
    assert result.next_token_ids.numel() == 0 and result.accept_lens.numel() == 0
    assert published[0].numel() == 0

    class NoCapture(ReferenceTarget):
        def extend(self, batch):
            out = super().extend(batch)
            out.logits_output.hidden_states = None
            return out

    sched.worker.target = NoCapture(sgl, pair[0], sched.req_pool, False, pair[1].cfg.target_layer_ids)
    req = sched.new_req(0, [256, 65, 66], 5)
    with pytest.raises(RuntimeError, match="set_dflash_layers_to_capture"):
        sched.prefill([req])


def test_lm_head_shard_drops_sglang_vocab_padding(sgl):
    """SGLang pads the lm_head rows (100 -> 128); drafts must never come from the padding."""
    from sglang_env import one_rank_group

    from sglang_dflash.worker.target import lm_head_shard

    with one_rank_group():
        from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead

        head = ParallelLMHead(100, 16)
        with torch.no_grad():
            head.weight.fill_(0.0)
            head.weight[:100] = -1.0  # every real logit below the padding's 0 for a positive hidden
        weight, first_id = lm_head_shard(head)
        assert head.weight.shape[0] == 128 and weight.shape == (100, 16) and first_id == 0
        _, tokens = OPS.greedy_head(torch.ones(3, 16), weight, first_id)
        assert (tokens < 100).all()
    with pytest.raises(ValueError, match="no dense 2-D `weight`"):
        lm_head_shard(torch.nn.Identity())


@pytest.fixture(scope="module")
def published(sgl):
    """SGLang's resolved config of a CPU server over the tiny target, published as the
    scheduler process publishes it; the target's ModelConfig as its ModelRunner holds it."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import prepare_server_args

    from sglang_dflash.reference.tiny_pair import TARGET_DIR

    # a hybrid target on CPU: SGLang keeps no linear-state snapshots, which needs no overlap
    args = prepare_server_args(["--model-path", str(TARGET_DIR), "--device", "cpu", "--disable-overlap-schedule",
                                "--disable-cuda-graph"])
    publish(args, role="test", ranks=SpawnRanks(world_rank=0))
    try:
        yield ModelConfig.from_server_args(args)
    finally:
        reset_context()


def test_read_server_settings_from_sglang_runtime_context(published, monkeypatch):
    from sglang.srt.runtime_context import get_context

    from sglang_dflash.reference.tiny_pair import DRAFTER_DIR
    from sglang_dflash.worker.settings import OPS_ENV, read_server_settings

    monkeypatch.setenv(OPS_ENV, "torch")
    # SGLang's own DFLASH argument handling refuses a CPU device, so the speculative
    # settings are laid over the plain server's published config
    get_context().override("test", speculative_draft_model_path=str(DRAFTER_DIR),
                           speculative_num_draft_tokens=8, enable_hierarchical_cache=True)
    assert read_server_settings("cpu") == _settings(
        drafter_path=str(DRAFTER_DIR), verify_width=8, device="cpu", hierarchical_cache=True, ops_env="torch")


def test_drafter_is_checked_against_the_target_sglang_loaded(published):
    from dataclasses import replace
    from types import SimpleNamespace

    from sglang_dflash.reference.tiny_pair import DRAFTER_DIR
    from sglang_dflash.worker.target import SGLangTarget, load_drafter_for
    from sglang_dflash.worker.settings import WorkerConfig

    cfg = WorkerConfig(drafter_path=str(DRAFTER_DIR), verify_width=16, op_backend="torch", tp_size=1)

    def runner(captured, attn_backend=None):
        model = SimpleNamespace(get_input_embeddings=lambda: None, lm_head=torch.nn.Linear(8, 264, bias=False))
        return SimpleNamespace(model_config=published, dtype=torch.float32, model=model, attn_backend=attn_backend,
                               spec_aux_config=SimpleNamespace(dflash_target_layer_ids=captured))

    drafter = load_drafter_for(cfg, runner([1, 3, 5]), torch.device("cpu"))
    assert drafter.cfg.target_layer_ids == (1, 3, 5) and drafter.ops.backend == "torch"
    # the target can verify at most the drafter's block
    assert load_drafter_for(replace(cfg, verify_width=4), runner([1, 3, 5]), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"--speculative-num-draft-tokens 17 .* exceeds the drafter's block_size 16"):
        load_drafter_for(replace(cfg, verify_width=17), runner([1, 3, 5]), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"SGLang captures target layers \[1, 3\]"):
        load_drafter_for(cfg, runner([1, 3]), torch.device("cpu"))

    # Kimi-Linear is hybrid: its linear-attention state needs SGLang's commit after verify
    class Hybrid:
        def update_mamba_state_after_mtp_verify(self):
            pass

    assert SGLangTarget(SimpleNamespace(model_runner=runner([], Hybrid())), 16).has_linear_state()
    with pytest.raises(ValueError, match="cannot commit their state"):
        SGLangTarget(SimpleNamespace(model_runner=runner([], object())), 16).has_linear_state()
